"""LoRA training on a frozen, sharded Flux base: flow matching at guidance 1.0, resumable, preemption-safe.

- ``train(cfg)`` / ``setup(cfg)`` + ``Trainer.run``: the loop (``loop.py``).
- ``train_step`` / ``StepCompiler``: the pure step and its compilation (``step.py``).
- ``read_lora_weights(path, step=None)``: a run's LoRA back as a model + meta (``checkpointing.py``).
- ``CachedExamples`` / ``write_cached_examples`` / ``BatchIterator``: the training-data format (``data.py``).
"""

from flux_jax.train.checkpointing import Checkpointer, read_lora_weights
from flux_jax.train.data import BatchIterator, CachedExamples, Example, write_cached_examples
from flux_jax.train.loop import Trainer, TrainingDivergedError, TrainResult, setup, train
from flux_jax.train.step import StepCompiler, train_step

__all__ = [
    "BatchIterator",
    "CachedExamples",
    "Checkpointer",
    "Example",
    "StepCompiler",
    "TrainResult",
    "Trainer",
    "TrainingDivergedError",
    "read_lora_weights",
    "setup",
    "train",
    "train_step",
    "write_cached_examples",
]
