"""LoRA training on a frozen, sharded Flux base: flow matching at guidance 1.0, resumable, preemption-safe.

- ``loop``: ``train(cfg)`` / ``setup(cfg)`` + ``Trainer.run``.
- ``build``: the model the trainer trains (``build_model``; ``lora_model``, the one "random Flux + adapters").
- ``state``: ``TrainState``, the trainable/frozen split and ``state_shardings_for`` (used by train and plan).
- ``step``: the pure ``train_step`` and its compilation (``StepCompiler``); ``abstract``: the same for shapes only.
- ``checkpointing``: orbax checkpoints and ``read_lora_weights`` (a run's LoRA from its meta).
- ``lora_sources``: a LoRA from a file or a run (``read_lora``, ``export_lora``); ``lora_init``: ``lora.init_from``.
- ``model_card``: the Hub model card `flux-jax export` writes beside a LoRA; ``hub_push``: ``--push-to-hub``.
- ``lease``: one trainer per run directory (``RunLease``, local or gs://).
- ``optim``, ``objective``, ``metrics``, ``preemption``, ``distributed``.
"""
