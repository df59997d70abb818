"""Convert a flux-jax Flax checkpoint (or any Flux checkpoint) into PyTorch safetensors.

    python convert/to_pytorch.py SRC DST [--layout bfl|diffusers] [--dtype fp32|bf16|fp16|fp8]
                                         [--shard-size 10GB] [--force]

--layout bfl (default) writes one BFL-layout file (`flux1-dev.safetensors` keys, what ComfyUI, Forge, kohya and
BFL's own code load); --layout diffusers writes a transformer directory (`config.json`, shards of at most
--shard-size, and the index) that `FluxTransformer2DModel.from_pretrained(DST)` loads. --dtype defaults to the
stored dtype, so a round trip is bit-exact. Same as `flux-jax convert SRC DST --layout bfl|diffusers`.
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
    parser.add_argument("--layout", choices=("bfl", "diffusers"), default="bfl")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="output dtype (default: keep)")
    parser.add_argument("--shard-size", default=None, help="diffusers layout: maximum shard size, e.g. 5GB")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    extra = ["--layout", args.layout]
    extra += ["--dtype", args.dtype] if args.dtype else []
    extra += ["--shard-size", args.shard_size] if args.shard_size else []
    extra += ["--force"] if args.force else []
    return cli_main(["convert", args.src, args.dst, *extra])


if __name__ == "__main__":
    sys.exit(main())
