"""`flux-jax extract-lora`: the LoRA of a fine-tune, (tuned - base) truncated by SVD on every Linear, written as a
kohya / diffusers / ComfyUI file (`flux_jax.lora_io.extract`, then the exporter `write_lora_file`)."""

from __future__ import annotations

import argparse
import sys

from flux_jax.errors import FluxJaxError

HELP = "extract a LoRA from a fine-tuned transformer: SVD of (tuned - base) on every Linear"
FORMATS = ("kohya", "diffusers", "comfy")  # what `flux-jax export --format` writes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output LoRA .safetensors file")
    parser.add_argument(
        "--base", required=True, help="the original transformer (any layout convert reads, or a Hub name of one)"
    )
    parser.add_argument("--tuned", required=True, help="the fine-tuned transformer, of the same architecture")
    parser.add_argument("--rank", type=int, help="rank kept per layer (with --energy: the largest rank allowed)")
    parser.add_argument(
        "--energy",
        type=float,
        help="per layer, the smallest rank whose retained energy (sum of kept s^2 / sum of s^2) is >= F, F in (0, 1]",
    )
    # Not argparse choices: a bad value is then one line (like every other input error), not usage text.
    parser.add_argument(
        "--format",
        required=True,
        metavar="{" + ",".join(FORMATS) + "}",
        help="LoRA file format, as flux-jax export writes it: kohya (ComfyUI, Forge, diffusers), "
        "diffusers (diffusers, ComfyUI, Forge), comfy (ComfyUI, Forge)",
    )
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default="fp32",
        help="tensor dtype of the file (default fp32: the file then holds the truncated delta the report describes)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")


def run(args: argparse.Namespace) -> int:
    import pathlib

    from tqdm import tqdm

    from flux_jax.atomic import OutputExistsError
    from flux_jax.lora_io.export import check_format, write_lora_file
    from flux_jax.lora_io.extract import check_request, extract_lora, report

    check_format(args.format)
    check_request(args.rank, args.energy)
    out = pathlib.Path(args.out)
    if out.exists() and not args.force:  # before hours of SVDs, not after
        raise OutputExistsError(f"{out} already exists (use --force to overwrite)")
    if out.suffix != ".safetensors":
        raise FluxJaxError(f"{out}: a LoRA file is a .safetensors file; name it *.safetensors")

    def bar(modules):
        return tqdm(modules, desc="extract-lora", unit="module", disable=None, leave=False)

    ex = extract_lora(args.base, args.tuned, rank=args.rank, energy=args.energy, progress=bar)
    lines, warnings = report(ex)
    for line in lines:
        print(line)
    for w in warnings:
        print(f"flux-jax extract-lora: warning: {w}", file=sys.stderr)
    meta = {"base": args.base, "tuned": args.tuned, "extracted_rank": args.rank, "extracted_energy": args.energy}
    meta = {k: v for k, v in meta.items() if v is not None}
    path = write_lora_file(
        out, ex.weights, args.format, config=ex.config, dtype=args.dtype, meta=meta, force=args.force
    )
    print(f"wrote {path}")
    return 0
