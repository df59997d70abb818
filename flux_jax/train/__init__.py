"""LoRA training on a frozen, sharded Flux base: flow matching at guidance 1.0, resumable, preemption-safe.

- ``train(cfg)`` / ``setup(cfg)`` + ``Trainer.run``: the loop (``loop.py``).
- ``train_step`` / ``StepCompiler``: the pure step and its compilation (``step.py``).
- ``read_lora_weights(path, step=None)``: a run's LoRA back as a model + meta (``checkpointing.py``).
- ``CachedExamples`` / ``write_cached_examples`` / ``BatchIterator``: the training-data format (``data.py``).
"""
