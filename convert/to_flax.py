"""Convert PyTorch Flux weights into a Flax (orbax) checkpoint directory for flux-jax.

    python convert/to_flax.py SRC DST [--dtype fp32|bf16|fp16|fp8] [--force]

SRC: a BFL single file (`flux1-dev.safetensors`; fp32 / bf16 / fp16, plain fp8 such as Kijai's `flux-dev2pro-fp8`,
or ComfyUI "scaled fp8"; a ComfyUI `model.diffusion_model.` prefix is fine) or a diffusers transformer directory
(`config.json` + `diffusion_pytorch_model*.safetensors`, e.g. a local copy of ashen0209/Flux-Dev2Pro). dev vs
schnell and the layout are detected. DST: a new directory (see `flux_jax/weights/flax_checkpoint.py` for its
layout), which `flux_jax.load_flux(DST, mesh=...)` and orbax's `StandardCheckpointer().restore` read directly.
The conversion streams one layer at a time (host memory stays at a few hundred MB whatever the model size).
Same as `flux-jax convert SRC DST --layout flax`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from flux_jax.cli import main as cli_main  # noqa: E402
from flux_jax.dtypes import DTYPES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="storage dtype (default: keep)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    extra = (["--dtype", args.dtype] if args.dtype else []) + (["--force"] if args.force else [])
    return cli_main(["convert", args.src, args.dst, "--layout", "flax", *extra])


if __name__ == "__main__":
    sys.exit(main())
