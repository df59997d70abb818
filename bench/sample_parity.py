"""Print the sampler's largest differences from diffusers' FluxPipeline (what tests/test_sampling_parity.py bounds).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python bench/sample_parity.py

Builds the same tiny random pipeline directory as the parity tests (demo encoders in the FLUX.1 layout and a
diffusers transformer) and prints max |delta| of the final latents and of the decoded image in [0, 1], fp32, for
guidance-distilled sampling (non-square, batch 2) and true CFG.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import tests.test_sampling_parity as parity  # noqa: E402
from flux_jax.data.demo import DemoDims, build_demo_encoders  # noqa: E402
from flux_jax.sampling.sampler import SampleSettings  # noqa: E402


def main() -> None:
    root = pathlib.Path(tempfile.mkdtemp(prefix="flux_jax_parity_"))
    cfg = parity.tiny_config()
    build_demo_encoders(root, dims=DemoDims(t5_dim=cfg.context_in_dim, clip_dim=cfg.vec_in_dim))
    parity.diffusers_flux(cfg, seed=3).save_pretrained(root / "transformer", safe_serialization=True)
    pipe, side = parity.torch_pipe.__wrapped__(root), parity.jax_side.__wrapped__(root)

    def report(name: str, got, want) -> None:
        lat, img = (np.abs(g - w).max() for g, w in zip(got, want, strict=True))
        print(f"{name}: latents max|d| {lat:.2e} (|x| max {np.abs(want[0]).max():.2f}), image max|d| {img:.2e}")

    s = SampleSettings(width=96, height=64, steps=4, guidance=3.5)
    noise = parity._noise(2, s)
    report(
        "distilled 96x64 batch 2, 4 steps",
        parity._jax_run(side, parity.PROMPTS, s, noise),
        parity._torch_run(pipe, parity.PROMPTS, s, noise),
    )
    s = SampleSettings(width=64, height=80, steps=3, guidance=1.0, cfg=2.5)
    noise = parity._noise(2, s, seed=1)
    report(
        "true CFG 2.5, 64x80 batch 2, 3 steps",
        parity._jax_run(side, parity.PROMPTS, s, noise, negative=parity.NEGATIVE),
        parity._torch_run(pipe, parity.PROMPTS, s, noise, negative_prompt=parity.NEGATIVE, true_cfg_scale=2.5),
    )


if __name__ == "__main__":
    main()
