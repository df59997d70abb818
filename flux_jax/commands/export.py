"""`flux-jax export`: a trained LoRA (run directory, checkpoint, or LoRA file) to a kohya / diffusers / ComfyUI file
with a Hub model card (README.md) beside it, optionally pushed to the Hub; or merged into a base checkpoint (no
card: a merged checkpoint is not a LoRA to share)."""

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
        "--trigger",
        action="append",
        metavar="WORD",
        help="trigger word(s) for the model card and the file's metadata; repeat for several "
        "(default: the run's lora.trigger_words, or the source file's)",
    )
    parser.add_argument(
        "--no-card", action="store_true", help="write no model card (README.md) and no validation grid beside the LoRA"
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="ORG/NAME",
        help="upload the LoRA, its card and grid to this Hugging Face model repository (token: HF_TOKEN)",
    )
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    parser.add_argument(
        "--dry-run", action="store_true", help="with --push-to-hub: list what would be uploaded, contact nothing"
    )
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="write NaN / Inf values (in the LoRA, or in the merged weights) instead of refusing them",
    )


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: `flux-jax --help` and the other commands need not load the trainer.
    from flux_jax.lora_io.merge import merge_lora
    from flux_jax.train.lora_sources import read_lora
    from flux_jax.weights.checkpoint import open_checkpoint

    src = args.src  # a path, or a run directory in a bucket (gs://)
    if args.push_to_hub is None and (args.private or args.dry_run):
        raise FluxJaxError("--private and --dry-run apply to --push-to-hub")
    if args.merge_into is None:
        return _export(args)
    for flag, given in (("--push-to-hub", args.push_to_hub), ("--trigger", args.trigger)):
        if given is not None:
            raise FluxJaxError(f"{flag} applies to a LoRA export, not to --merge-into (a merged checkpoint)")
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


def _export(args: argparse.Namespace) -> int:
    from flux_jax.train import hub_push
    from flux_jax.train.lora_sources import export_lora
    from flux_jax.train.model_card import check_card_target, write_model_card

    if args.format is None:
        raise FluxJaxError("--format is required (kohya, diffusers or comfy) unless --merge-into is given")
    if args.trigger is not None and not all(w.strip() for w in args.trigger):
        raise FluxJaxError(f"--trigger: a trigger word is empty ({args.trigger})")
    if args.push_to_hub is not None:
        hub_push.check_repo_id(args.push_to_hub)
    if not args.no_card:
        check_card_target(args.out, force=args.force)  # before the export: a refusal leaves nothing half-done
    out = export_lora(
        args.src, args.out, args.format, dtype=args.dtype, step=args.step, ema=args.ema, force=args.force,
        metadata=args.metadata or "public", allow_nonfinite=args.allow_nonfinite, trigger_words=args.trigger,
    )  # fmt: skip
    print(f"wrote {out}")
    files = [out]
    if not args.no_card:
        card = write_model_card(out, args.format, args.src, repo_id=args.push_to_hub, ema=args.ema)
        files += [f for f in (card.grid, card.card) if f is not None]
        print(f"wrote {card.card}" + (f" and {card.grid}" if card.grid is not None else ""))
    if args.push_to_hub is not None:
        uploads = hub_push.plan_upload(files)
        if args.dry_run:
            print(hub_push.describe_upload(uploads, args.push_to_hub, private=args.private))
        else:
            print(f"uploaded to {hub_push.push(uploads, args.push_to_hub, private=args.private)}")
    return 0
