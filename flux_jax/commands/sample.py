"""`flux-jax sample`: images from a Flux base (with LoRAs at their scales), as the PyTorch tools would draw them.

    flux-jax sample --base FLUX.1-dev --lora run_dir:0.8 --prompt "a cat" --prompt "a dog" --seed 42 --out samples

``--base`` is a FLUX.1 diffusers pipeline directory (transformer/, vae/, text_encoder/, text_encoder_2/,
tokenizer/, tokenizer_2/), or a transformer checkpoint of any layout with ``--encoders`` a pipeline directory for
the rest; either may be a Hugging Face Hub name (``black-forest-labs/FLUX.1-dev``), fetched first (`flux_jax.hub`).
Prompts are sampled ``--batch`` at a time; batch k (0, 1, ...) is one noise draw of shape [B, 16, H/8, W/8] for
seed ``--seed + k``, as diffusers' FluxPipeline (``num_images_per_prompt`` / a prompt list) and ComfyUI's KSampler
draw a batch, so image j of batch k is the image those tools give for that seed, batch size and position. Every
input is checked (and every LoRA read and fitted to the base's config) before anything loads or compiles; a Hub name
is fetched after the cheap checks and then checked as the local path it became. A LoRA file's text-encoder parts
(CLIP-L, T5; see `flux_jax.lora_io.text_encoders`) are applied too, merged into the encoders at the LoRA's scale
before the prompts are encoded (checked against the encoders' headers first). ``--out`` appears only when complete:
one PNG per image carrying its settings as text chunks, ``grid.png`` and ``samples.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import pathlib
from collections.abc import Sequence

from flux_jax.errors import FluxJaxError

log = logging.getLogger(__name__)

HELP = "sample images from a Flux base (+ LoRAs): PNGs carrying their settings, a grid and a JSON sidecar"

# flux_jax.sampling.schedules.MATCHES, spelled out so that building the parser imports nothing heavy (a test
# checks the two agree).
MATCHES = ("diffusers", "comfyui", "bfl")
PIXELS_PER_TOKEN = 16  # the VAE's 8x downsampling, then Flux's 2x2 patches
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds
SIDECAR = "samples.json"
GRID = "grid.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        required=True,
        help="a FLUX.1 diffusers pipeline directory (transformer/, vae/, text_encoder/, text_encoder_2/, "
        "tokenizer/, tokenizer_2/), or a transformer checkpoint of any layout together with --encoders; or a "
        "Hugging Face Hub name of either (org/name[@revision][/file.safetensors], e.g. black-forest-labs/FLUX.1-dev)",
    )
    parser.add_argument(
        "--encoders",
        metavar="DIR",
        help="a FLUX.1 pipeline directory (with or without transformer/) or Hub name for the VAE, text encoders "
        "and tokenizers; required when --base is a transformer checkpoint",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA file (any format flux-jax imports) or a training run directory, at SCALE (default 1.0); "
        "repeat for several LoRAs at once",
    )
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt; repeat for several")
    prompts.add_argument("--prompts", metavar="FILE", help="a text file of prompts, one per line (blank lines skipped)")
    parser.add_argument(
        "--negative", metavar="TEXT", help="negative prompt for true CFG (--cfg > 1); default: the empty prompt"
    )
    parser.add_argument("--width", type=int, default=1024, help="image width in pixels, a multiple of 16 (1024)")
    parser.add_argument("--height", type=int, default=1024, help="image height in pixels, a multiple of 16 (1024)")
    parser.add_argument("--steps", type=int, default=28, help="denoising steps (28)")
    parser.add_argument(
        "--guidance", type=float, default=3.5, help="guidance embedding value (3.5; 1.0 for a de-distilled base)"
    )
    parser.add_argument(
        "--cfg", type=float, default=1.0, help="true-CFG scale (1.0: off; e.g. 3.5 with --guidance 1 on Dev2Pro)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the first batch; batch k uses seed + k (0)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per batch (one noise draw each) (1)")
    parser.add_argument(
        "--match", choices=MATCHES, default="diffusers", help="whose recipe to reproduce for a seed (diffusers)"
    )
    parser.add_argument(
        "--dtype", choices=("fp32", "bf16"), help="activation dtype (default: bf16 on accelerators, fp32 on CPU)"
    )
    parser.add_argument(
        "--base-dtype",
        choices=("fp32", "bf16", "fp8"),
        help="how the transformer is stored in memory (default: --dtype)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    path: str
    scale: float = 1.0

    def to_json(self) -> dict:
        return {"path": self.path, "scale": self.scale}


def parse_lora_spec(spec: str) -> LoraSpec:
    """``PATH[:SCALE]``: the text after the last ':' is the scale when it is a number, else part of the path
    (``gs://bucket/run`` is a path; ``gs://bucket/run:0.5`` that path at 0.5)."""
    path, sep, tail = spec.rpartition(":")
    if not sep or not path:
        return LoraSpec(spec)
    try:
        scale = float(tail)
    except ValueError:
        return LoraSpec(spec)
    if not math.isfinite(scale):
        raise FluxJaxError(f"--lora {spec}: the scale {tail} is not a finite number")
    return LoraSpec(path, scale)


def read_prompts(prompt: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """The ``--prompt`` values, or the lines of ``--prompts`` (surrounding whitespace stripped, blank ones
    skipped); an empty or unreadable file is an error naming it."""
    if prompts_file is None:
        return list(prompt or [])
    path = pathlib.Path(prompts_file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FluxJaxError(f"--prompts {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise FluxJaxError(f"--prompts {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise FluxJaxError(f"--prompts {path}: cannot read it ({e.strerror or e})") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise FluxJaxError(f"--prompts {path}: the file holds no prompt (one per line)")
    return lines


def check_numbers(args: argparse.Namespace) -> None:
    """The settings' values, each error naming its flag."""
    for flag in ("width", "height"):
        value = getattr(args, flag)
        if value < PIXELS_PER_TOKEN or value % PIXELS_PER_TOKEN:
            raise FluxJaxError(f"--{flag} {value} must be a positive multiple of {PIXELS_PER_TOKEN}")
    if args.steps < 1:
        raise FluxJaxError(f"--steps {args.steps} must be at least 1")
    if not math.isfinite(args.cfg) or args.cfg <= 0:
        raise FluxJaxError(f"--cfg {args.cfg} must be a positive number (1.0 turns true CFG off)")
    if not math.isfinite(args.guidance):
        raise FluxJaxError(f"--guidance {args.guidance} must be a finite number")
    if args.batch < 1:
        raise FluxJaxError(f"--batch {args.batch} must be at least 1")
    if not 0 <= args.seed <= MAX_SEED:
        raise FluxJaxError(f"--seed {args.seed} must be in [0, 2**64 - 1]")


def batches(prompts: Sequence[str], size: int) -> list[list[str]]:
    """Consecutive runs of ``size`` prompts (the last may be shorter); batch k is sampled with seed + k."""
    return [list(prompts[i : i + size]) for i in range(0, len(prompts), size)]


def check_out(out: str, force: bool) -> tuple[pathlib.Path, bool]:
    """(the output directory, whether an existing one may be replaced): an existing empty directory may; a
    non-empty one only with ``force``; a file never."""
    if "://" in out:
        raise FluxJaxError(f"--out {out}: must be a local directory (copy the result to the bucket afterwards)")
    path = pathlib.Path(out)
    if path.exists() and not path.is_dir():
        raise FluxJaxError(f"--out {path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise FluxJaxError(f"--out {path}: exists and is not empty (use --force to replace it)")
        return path, True
    return path, path.is_dir()


# ---------------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    loras = [parse_lora_spec(s) for s in args.lora]
    prompts = read_prompts(args.prompt, args.prompts)
    check_numbers(args)
    last_seed = args.seed + len(batches(prompts, args.batch)) - 1
    if last_seed > MAX_SEED:
        raise FluxJaxError(f"--seed {args.seed}: the last batch's seed {last_seed} would pass 2**64 - 1")
    if args.negative is not None and args.cfg <= 1:
        log.warning("--negative is used only with true CFG (--cfg above 1); sampling without it")
    out, replace = check_out(args.out, args.force)

    # Imported here, not at the top: `flux-jax --help` and the other commands need not load JAX.
    from flux_jax.data.encoding import check_text_encoder_lora
    from flux_jax.lora_io.combine import combine_loras, combine_text_encoder_loras
    from flux_jax.lora_io.text_encoders import COMPONENTS, count
    from flux_jax.lora_io.weights import validate
    from flux_jax.sampling.loading import resolve_base
    from flux_jax.sampling.sampler import SampleSettings
    from flux_jax.train.lora_sources import read_lora
    from flux_jax.weights.checkpoint import open_checkpoint

    base = resolve_base(args.base, args.encoders)  # reads no weights
    with open_checkpoint(base.transformer) as checkpoint:  # headers only: the config the LoRAs must fit
        config = checkpoint.config
    weights, text_parts = [], []
    for spec in loras:
        lora = read_lora(spec.path, config=config)
        validate(lora.weights, config, spec.path)  # a run knows its own config: it must be the base's too
        weights.append((lora.weights, spec.scale))
        text_parts.append((lora.text_encoders, spec.scale))
    combined = combine_loras(weights)
    text_loras = combine_text_encoder_loras(text_parts)
    if text_loras:
        check_text_encoder_lora(base.encoders, text_loras, "--lora " + " + ".join(s.path for s in loras))
    settings = SampleSettings(
        width=args.width, height=args.height, steps=args.steps, guidance=args.guidance, cfg=args.cfg, seed=args.seed,
        match=args.match,
    )  # fmt: skip
    settings.check(PIXELS_PER_TOKEN)

    import jax

    from flux_jax.atomic import atomic_dir

    dtype = args.dtype or ("fp32" if jax.default_backend() == "cpu" else "bf16")
    negative = args.negative if args.negative is not None else ""
    record = {
        "base": os.fspath(args.base),
        "encoders": os.fspath(args.encoders) if args.encoders else None,
        "loras": [s.to_json() for s in loras],
        "dtype": dtype,
        "base_dtype": args.base_dtype or dtype,
        "schnell": not config.guidance_embed,
    }
    if text_loras:  # which encoders the LoRAs changed (diffusers applies a CLIP part only, ComfyUI both)
        record["text_encoder_lora"] = "+".join(c for c in COMPONENTS if c in text_loras)
        log.info("applying the LoRAs' text-encoder parts (%s)", count(text_loras))
    with atomic_dir(out, force=replace) as tmp:
        images = _sample(
            base, combined, text_loras, prompts, negative, settings, args.batch, record, tmp, not args.no_progress
        )
    print(f"wrote {len(images)} image(s), {GRID} and {SIDECAR} to {out}")
    return 0


def _sample(base, combined, text_loras, prompts, negative, settings, batch, record, tmp, progress) -> list[dict]:
    """Load, sample batch by batch, and write the PNGs, the grid and the sidecar into ``tmp``."""
    from tqdm import tqdm

    from flux_jax import __version__
    from flux_jax.lora_io.adapters import apply_lora_weights
    from flux_jax.sampling.images import grid, write_png
    from flux_jax.sampling.loading import load_transformer, load_vae_for
    from flux_jax.sampling.prompts import PromptEncoder
    from flux_jax.sampling.sampler import FluxSampler
    from flux_jax.sharding import make_mesh

    dtype = record["dtype"]
    mesh = make_mesh(1, -1, 1)  # every device: the base FSDP-sharded, as in training
    model = load_transformer(base.transformer, dtype=record["base_dtype"], compute_dtype=dtype, mesh=mesh)
    if combined:
        apply_lora_weights(model, combined, 1.0, mesh=mesh, where=" + ".join(s["path"] for s in record["loras"]))
    vae = load_vae_for(base.encoders, dtype=dtype, mesh=mesh)
    groups = batches(prompts, batch)
    encoder = PromptEncoder.load(base.encoders, mesh=mesh, dtype=dtype, loras=text_loras)
    # True CFG needs the negative branch, encoded with each batch (ComfyUI's T5 length follows the longest
    # prompt); with cfg 1 the guidance-distilled model runs alone (as diffusers does).
    uncond_text = negative if settings.cfg > 1 else None
    conditions = [
        encoder.encode_with_negative(g, uncond_text, match=settings.match, schnell=record["schnell"]) for g in groups
    ]
    del encoder  # the text encoders are not needed any more (T5-XXL alone is 9 GB in bf16)
    sampler = FluxSampler.from_model(model, vae, mesh=mesh, dtype=dtype)

    version = f"flux-jax {__version__}"
    digits = max(3, len(str(len(prompts) - 1)))  # file names sort in sampling order
    written: list[dict] = []
    pictures = []
    with tqdm(total=len(prompts), unit="image", desc="sampling", disable=not progress) as bar:
        for k, (group, (cond, uncond)) in enumerate(zip(groups, conditions, strict=True)):
            batch_settings = dataclasses.replace(settings, seed=settings.seed + k)
            pixels = sampler.images(cond, batch_settings, negative=uncond)
            for j, (prompt, image) in enumerate(zip(group, pixels, strict=True)):
                entry = {
                    "file": f"{len(written):0{digits}d}_seed{batch_settings.seed}.png",
                    "prompt": prompt,
                    "negative": negative if uncond is not None else "",
                    "seed": batch_settings.seed,
                    "batch_size": len(group),
                    "batch_index": j,
                    "steps": settings.steps,
                    "guidance": settings.guidance,
                    "cfg": settings.cfg,
                    "width": settings.width,
                    "height": settings.height,
                    "match": settings.match,
                    **record,
                }
                write_png(tmp / entry["file"], image, _png_text(entry, version))
                written.append(entry)
                pictures.append(image)
            bar.update(len(group))
    write_png(tmp / GRID, grid(pictures, columns=math.ceil(math.sqrt(len(pictures)))), {"Software": version})
    sidecar = {"version": version, "grid": GRID, "images": written}
    (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return written


def _png_text(entry: dict, version: str) -> dict[str, str]:
    """An image's settings as PNG text: numbers as Python writes them, the LoRAs as JSON, None as ''."""
    text = {}
    for key, value in entry.items():
        if key == "file":
            continue
        if key == "loras":
            text[key] = json.dumps(value, ensure_ascii=False)
        elif value is None:
            text[key] = ""
        else:
            text[key] = str(value).lower() if isinstance(value, bool) else str(value)
    text["Software"] = version
    return text
