"""Flux's frozen encoders in Flax NNX: the VAE, the T5 v1.1 encoder and the CLIP-L text tower.

Each model has a frozen config dataclass (real-size and tiny presets, plus a constructor from the
diffusers/transformers config dict), an NNX module, and a `load_*` / `export_*` pair driven by
one declarative key table (see `keys.py`).
"""
