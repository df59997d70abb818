"""Base checkpoints: every Flux transformer layout flux-jax reads and writes.

- `flux_keys`: the one declarative key table (BFL <-> diffusers <-> Flax).
- `handle`: `FluxCheckpoint`, the opened checkpoint whatever its layout; `checkpoint.open_checkpoint` opens one.
- `flax_checkpoint`, `flax_layout`: Flax checkpoints and the model's parameter tree; `writers`: BFL / diffusers.
- `safetensors_file`, `sources`, `fp8`: memory-mapped files, lazy tensors, exact fp8 casts.
- `load`: `load_flux`, every device shard read into place; `convert`: `flux-jax convert` for base checkpoints.
"""
