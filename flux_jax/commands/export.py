"""`flux-jax export`: a trained LoRA (run directory, checkpoint, or LoRA file) to a kohya / diffusers / ComfyUI file,
or merged into a base checkpoint."""

from __future__ import annotations

import argparse

from flux_jax.errors import FluxJaxError

HELP = "export a LoRA as a kohya / diffusers / ComfyUI file, or merge it into a base checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src", help="training run directory (local or gs://), checkpoint directory, or a LoRA .safetensors file"
    )
    parser.add_argument("out", help="output .safetensors file (with --merge-into --layout diffusers: a directory)")
    parser.add_argument(
        "--format",
        choices=("kohya", "diffusers", "comfy"),
        help="LoRA file format: kohya (ComfyUI, Forge, diffusers), diffusers (diffusers, ComfyUI, Forge), "
        "comfy (ComfyUI, Forge)",
    )
    parser.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), help="tensor dtype (default: bf16 for a run, else the source's)"
    )
    parser.add_argument("--step", type=int, help="checkpoint step of a run directory (default: the latest)")
    parser.add_argument("--ema", action="store_true", help="export the run's EMA weights (runs with optim.ema_decay)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument(
        "--merge-into",
        metavar="BASE",
        help="write BASE + LoRA as a full transformer checkpoint (BASE: any layout convert reads, or a Hugging Face "
        "Hub name of one: org/name[@revision][/file.safetensors])",
    )
    parser.add_argument("--layout", choices=("bfl", "diffusers"), default="bfl", help="layout of a merged checkpoint")
    parser.add_argument("--strength", type=float, default=1.0, help="LoRA strength for --merge-into (default 1.0)")
    parser.add_argument(
        "--metadata",
        choices=("public", "full"),
        help="public (default): no local paths in the file's metadata (names only, no full run config); "
        "full: keep everything, the run config included",
    )
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="write NaN / Inf values (in the LoRA, or in the merged weights) instead of refusing them",
    )


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: `flux-jax --help` and the other commands need not load the trainer.
    from flux_jax.lora_io.merge import merge_lora
    from flux_jax.train.lora_sources import export_lora, read_lora
    from flux_jax.weights.checkpoint import open_checkpoint

    src = args.src  # a path, or a run directory in a bucket (gs://)
    if args.merge_into is None:
        if args.format is None:
            raise FluxJaxError("--format is required (kohya, diffusers or comfy) unless --merge-into is given")
        out = export_lora(
            src, args.out, args.format, dtype=args.dtype, step=args.step, ema=args.ema, force=args.force,
            metadata=args.metadata or "public", allow_nonfinite=args.allow_nonfinite,
        )  # fmt: skip
        print(f"wrote {out}")
        return 0
    if args.format is not None:
        raise FluxJaxError("--format does not apply to --merge-into (the output is a checkpoint; see --layout)")
    if args.metadata is not None:
        raise FluxJaxError("--metadata does not apply to --merge-into (a merged checkpoint carries no LoRA metadata)")
    with open_checkpoint(args.merge_into) as base:  # headers only: the base's config fixes a LoRA file's shapes
        config = base.config
    weights = read_lora(src, config=config, step=args.step, ema=args.ema, allow_nonfinite=args.allow_nonfinite).weights
    out = merge_lora(
        args.merge_into, weights, args.out, layout=args.layout, dtype=args.dtype, strength=args.strength,
        force=args.force, allow_nonfinite=args.allow_nonfinite,
    )  # fmt: skip
    print(f"wrote {out}")
    return 0
