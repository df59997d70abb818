"""Sampling: text-to-image with the Flux transformer on the training mesh, reproducing what the PyTorch tools draw.

- ``noise``: torch's CPU ``randn`` in numpy (the initial latents diffusers, ComfyUI and BFL draw for a seed).
- ``schedules``: each tool's sigma schedule and the timestep value its model sees (``match``).
- ``prompts``: prompts -> T5 states and CLIP pooled vectors with the JAX encoders.
- ``sampler``: ``FluxSampler``, the denoising loop (one compiled function per shape, steps and mode) and the VAE
  decode to uint8.
- ``loading``: a base for sampling from a FLUX.1 pipeline directory, or a transformer plus an encoders directory.
- ``images``: PNGs that carry their settings, grids, side-by-side pictures and loss curves.
"""
