"""The model card (``README.md``) `flux-jax export` writes beside a LoRA, in the Hugging Face Hub's format.

Front matter the Hub reads: ``base_model`` (the inference target), ``base_model_relation: adapter``,
``library_name: diffusers``, ``pipeline_tag: text-to-image``, ``tags``, ``instance_prompt`` (the trigger words),
the base's license and a ``widget`` showing the last validation grid. The body says how the LoRA was trained, how
to use it in diffusers and ComfyUI, at which scale, and shows that grid (copied beside the LoRA as
``<stem>_grid.png``, so the folder uploads as it is).

The card is built from the exported file's own metadata (so card and file say the same) and, for a run, from its
checkpoint meta (optimizer, resolution, batch: numbers and choices of the run config, never its strings) and its
last validation (``samples/<step>/``). It names no local path whatever the file's metadata mode: the base by its
name, the dataset by its size only.

The recipe's inference target is FLUX.1-dev whatever the training base was (Dev2Pro, the usual one, is a
guidance-1.0 fine-tune of it); a base without a guidance embedding is FLUX.1-schnell's shape, so its LoRA is
for schnell.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from etils import epath

from flux_jax.atomic import OutputExistsError, atomic_file
from flux_jax.lora_io.export import path_name, public_meta
from flux_jax.lora_io.import_ import META_METADATA_KEY
from flux_jax.lora_io.weights import most_common, parse_module
from flux_jax.model.config import FluxConfig, config_from_metadata
from flux_jax.storage import is_local_file
from flux_jax.train.checkpointing import META_FORMAT, read_run_meta
from flux_jax.train.validation import GRID, MARKER, SAMPLES_DIR
from flux_jax.weights.safetensors_file import SafetensorsFile

CARD_NAME = "README.md"
TAGS = ("lora", "flux", "text-to-image", "flux-jax")
# The first body line of every card written here: a README.md without it is someone else's and is kept.
OURS = "<!-- Written by `flux-jax export`, which replaces this file on the next export. -->"
_TRIGGER_PHRASE = "modelspec.trigger_phrase"


@dataclasses.dataclass(frozen=True)
class Base:
    """A Hub base model a LoRA is used on, with its license and the settings it renders at."""

    repo: str
    license: Mapping[str, str]
    guidance: float
    steps: int

    @property
    def name(self) -> str:
        return self.repo.rsplit("/", 1)[-1]


FLUX_DEV = Base(
    "black-forest-labs/FLUX.1-dev",
    {
        "license": "other",
        "license_name": "flux-1-dev-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
    },
    guidance=3.5,
    steps=28,
)
FLUX_SCHNELL = Base("black-forest-labs/FLUX.1-schnell", {"license": "apache-2.0"}, guidance=0.0, steps=4)


def inference_base(config: FluxConfig | None) -> Base:
    """FLUX.1-dev for a dev-shaped LoRA (Dev2Pro included), FLUX.1-schnell for one without a guidance embedding."""
    return FLUX_SCHNELL if config is not None and not config.guidance_embed else FLUX_DEV


@dataclasses.dataclass(frozen=True)
class Grid:
    """A run's validation grid: ``samples/<step>/grid.png`` and what its marker says about it."""

    source: epath.Path
    step: int
    prompts: tuple[str, ...]
    settings: Mapping[str, Any]


def last_grid(run_dir: epath.Path, up_to: int) -> Grid | None:
    """The latest completed validation grid of steps <= ``up_to`` (a later one does not show this LoRA)."""
    samples = run_dir / SAMPLES_DIR
    if not samples.is_dir():
        return None
    steps = sorted((int(p.name) for p in samples.iterdir() if p.name.isdigit() and int(p.name) <= up_to), reverse=True)
    for step in steps:
        folder = samples / str(step)
        if not ((folder / MARKER).exists() and (folder / GRID).exists()):
            continue  # killed before it finished, or a loss-only validation
        try:
            record = json.loads((folder / MARKER).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            prompts = tuple(str(p) for p in record.get("prompts") or ())
            return Grid(folder / GRID, step, prompts, dict(record.get("settings") or {}))
    return None


@dataclasses.dataclass(frozen=True)
class CardFacts:
    """Everything a card says (path-free by construction: see `card_facts`)."""

    lora_file: str
    """The LoRA's file name."""
    fmt: str
    base: Base
    trigger_words: tuple[str, ...]
    meta: Mapping[str, Any]
    """The public training summary of a flux-jax run; empty for a file from another trainer."""
    run: Mapping[str, Any]
    """The run config (only its numbers and choices are read); empty when unknown."""
    rank: int | None
    grid: Grid | None = None
    grid_file: str | None = None
    repo_id: str | None = None
    ema: bool = False
    """The file holds the run's EMA weights (``--ema``; a file does not record it)."""


@dataclasses.dataclass(frozen=True)
class CardFiles:
    """What `write_model_card` wrote."""

    card: pathlib.Path
    grid: pathlib.Path | None


def card_path(lora_path: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(lora_path).with_name(CARD_NAME)


def grid_path(lora_path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(lora_path)
    return path.with_name(f"{path.stem}_grid.png")


def is_our_card(path: pathlib.Path) -> bool:
    try:
        return OURS in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def check_card_target(lora_path: str | os.PathLike, *, force: bool = False) -> None:
    """Refuse (before anything is exported) to replace a README.md that another tool or a person wrote."""
    card = card_path(lora_path)
    if card.exists() and not force and not is_our_card(card):
        raise OutputExistsError(
            f"{card} exists and was not written by flux-jax; use --force to replace it, or --no-card to keep it"
        )


def _lora_rank(tensors: Mapping[str, Any]) -> int | None:
    """The most common rank of a file we wrote: the first dimension of its down / A matrices."""
    downs = [info.shape[0] for key, info in tensors.items() if key.endswith((".lora_down.weight", ".lora_A.weight"))]
    return most_common(downs)


def _trigger_words(meta: Mapping[str, Any], metadata: Mapping[str, str]) -> tuple[str, ...]:
    words = meta.get("trigger_words")
    if isinstance(words, list) and words:
        return tuple(str(w) for w in words)
    phrase = metadata.get(_TRIGGER_PHRASE, "").strip()  # another trainer's, carried over by the conversion
    return (phrase,) if phrase else ()


def card_facts(
    lora_path: str | os.PathLike, fmt: str, src: str | os.PathLike, *, repo_id: str | None = None, ema: bool = False
) -> CardFacts:
    """What the card for the exported ``lora_path`` (written from ``src``, a run directory or a LoRA file) says."""
    lora_path = pathlib.Path(lora_path)
    with SafetensorsFile(lora_path) as f:
        metadata = dict(f.metadata)
        rank = _lora_rank(f.tensors)
    config = config_from_metadata(metadata, str(lora_path))
    meta = json.loads(metadata.get(META_METADATA_KEY) or "{}")  # written by flux-jax: valid JSON
    meta = meta if isinstance(meta, dict) else {}
    trigger = _trigger_words(meta, metadata)
    ours = meta.get("format") == META_FORMAT  # a flux-jax run's summary
    run = meta.get("config") if ours and isinstance(meta.get("config"), dict) else {}  # a --metadata full file
    grid = None
    if ours and not is_local_file(src):  # a run: the config and the validation from its checkpoint
        run_dir, step, run_meta = read_run_meta(src, meta.get("step"))
        run = run_meta.get("config") or {}
        grid = last_grid(run_dir, step)
    return CardFacts(
        lora_file=lora_path.name,
        fmt=fmt,
        base=inference_base(config),
        trigger_words=trigger,
        meta=public_meta(meta) if ours else {},  # the file may be --metadata full: the card stays path-free
        run=run,
        rank=int(meta.get("rank") or rank or 0) or None,
        grid=grid,
        grid_file=grid_path(lora_path).name if grid is not None else None,
        repo_id=repo_id,
        ema=ema,
    )


def write_model_card(
    lora_path: str | os.PathLike,
    fmt: str,
    src: str | os.PathLike,
    *,
    repo_id: str | None = None,
    ema: bool = False,
) -> CardFiles:
    """Write README.md (and ``<stem>_grid.png`` when the run has a validation grid) beside the exported LoRA.

    Both atomically, the grid first (a card never shows a missing picture). `check_card_target` decides before
    the export whether README.md may be replaced; ``repo_id`` (``org/name``) is what the card's code loads;
    ``ema``: the export took the run's EMA weights.
    """
    facts = card_facts(lora_path, fmt, src, repo_id=repo_id, ema=ema)
    grid = None
    if facts.grid is not None:
        grid = grid_path(lora_path)
        with atomic_file(grid) as tmp:
            tmp.write_bytes(facts.grid.source.read_bytes())
    card = card_path(lora_path)
    with atomic_file(card) as tmp:
        tmp.write_text(model_card(facts), encoding="utf-8")
    return CardFiles(card, grid)


# --------------------------------------------------------------------------------------------------
# The text


def front_matter(facts: CardFacts) -> dict[str, Any]:
    out: dict[str, Any] = {
        "base_model": facts.base.repo,
        "base_model_relation": "adapter",
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        **facts.base.license,
        "tags": list(TAGS),
    }
    if facts.trigger_words:
        out["instance_prompt"] = ", ".join(facts.trigger_words)
    if facts.grid is not None:
        text = facts.grid.prompts[0] if facts.grid.prompts else out.get("instance_prompt", "")
        out["widget"] = [{"text": text, "output": {"url": facts.grid_file}}]
    return out


def model_card(facts: CardFacts) -> str:
    """The card's text: YAML front matter, then Markdown."""
    title = facts.repo_id.rsplit("/", 1)[-1] if facts.repo_id else pathlib.Path(facts.lora_file).stem
    base = facts.base
    parts = [
        "---\n" + yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True) + "---",
        OURS,
        f"# {title}",
        f"A LoRA for [{base.name}](https://huggingface.co/{base.repo}) ({_format_name(facts.fmt)} format), "
        + ("trained with flux-jax (JAX)." if facts.meta else "converted by flux-jax."),
        _trigger_text(facts),
        _training(facts),
        _usage(facts),
        _validation(facts),
    ]
    return "\n\n".join(p for p in parts if p).rstrip() + "\n"


def _format_name(fmt: str) -> str:
    return {"kohya": "kohya", "diffusers": "diffusers / PEFT", "comfy": "ComfyUI"}.get(fmt, fmt)


def _trigger_text(facts: CardFacts) -> str:
    if not facts.trigger_words:
        return "No trigger words were recorded for it."
    words = ", ".join(f"`{w}`" for w in facts.trigger_words)
    return f"Trigger words: {words} (write them in the prompt)."


def _number(value: Any) -> str:
    """1.0 as '1.0' (a scale or a guidance reads as a float), 1e-4 as '0.0001', 16 as '16'."""
    if isinstance(value, float):
        return f"{value:.1f}" if value.is_integer() else f"{value:g}"
    return str(value)


def _value(run: Mapping[str, Any], section: str, key: str) -> int | float | None:
    """A number of the run config. Its strings are never read (they may be paths), except `_literal`'s."""
    value = (run.get(section) or {}).get(key)
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _literal(run: Mapping[str, Any], section: str, key: str, choices: Sequence[str]) -> str | None:
    """A run config field that is one of ``choices`` (an optimizer name, a schedule), else None."""
    value = (run.get(section) or {}).get(key)
    return value if value in choices else None


def _dataset_size(description: Any) -> str | None:
    """'16 examples' from a dataset description ('cached examples NAME (16 examples, buckets ...)')."""
    m = re.search(r"\((\d+) (examples|images|records)\b", str(description or ""))
    return f"{m.group(1)} {m.group(2)}" if m else None


def _resolution(run: Mapping[str, Any]) -> str | None:
    data = run.get("data") or {}
    sizes = [s for s in data.get("resolutions") or () if isinstance(s, int)]
    if sizes:
        return ", ".join(str(s) for s in sizes) + " (buckets)"
    return str(data["resolution"]) if isinstance(data.get("resolution"), int) else None


def _training(facts: CardFacts) -> str:
    meta, run = facts.meta, facts.run
    if not meta:
        rank = f" (rank {facts.rank})" if facts.rank else ""
        return (
            f"## Training\n\nThis LoRA{rank} comes from another trainer's file: it records no flux-jax training run, "
            "so how it was trained is not known here."
        )
    base_name = str(meta.get("base") or "an unnamed base")
    guidance = meta.get("guidance")
    lines = ["## Training", ""]
    how = f"Trained with flux-jax on `{base_name}`"
    if meta.get("guidance_range"):
        low, high = meta["guidance_range"]
        how += f", the guidance embedding drawn in [{_number(low)}, {_number(high)}]."
    elif guidance is not None:
        how += f" at guidance {_number(guidance)}."
    else:
        how += "."
    lines.append(how)
    if guidance == 1.0 and not meta.get("guidance_range") and facts.base is FLUX_DEV:
        lines.append(
            "\nThis is the Dev2Pro recipe: the LoRA is trained at guidance 1.0 on a guidance-1.0 fine-tune of "
            "FLUX.1-dev (such as Flux-Dev2Pro, which undoes the guidance distillation), so it learns the subject "
            "without bending FLUX.1-dev's distilled guidance, and is then used on FLUX.1-dev itself at its usual "
            f"guidance {_number(FLUX_DEV.guidance)}."
        )
    rows: list[tuple[str, str]] = []
    if meta.get("step") is not None:
        planned = f" of {meta['steps']}" if meta.get("steps") is not None else ""
        rows.append(("steps", f"{meta['step']}{planned}"))
    rank, alpha = meta.get("rank", facts.rank), meta.get("alpha")
    if rank:
        lora = f"rank {rank}"
        if alpha is not None:
            lora += f", alpha {_number(alpha)} (scale {_number(float(alpha) / float(rank))})"
        rows.append(("LoRA", lora))
    targets = meta.get("targets")
    if targets:
        shown = targets if isinstance(targets, str) else ", ".join(map(str, targets))
        rows.append(("targets", f"`{shown}`"))
    if meta.get("blocks"):
        rows.append(("blocks", ", ".join(map(str, meta["blocks"]))))
    if meta.get("timestep_sampling"):
        rows.append(("timestep sampling", f"`{meta['timestep_sampling']}`"))
    if (resolution := _resolution(run)) is not None:
        rows.append(("resolution", resolution))
    if (size := _dataset_size(meta.get("dataset"))) is not None:
        rows.append(("dataset", size))
    batch, accum = _value(run, "train", "batch_size"), _value(run, "train", "grad_accum")
    if batch is not None:
        rows.append(("batch", f"{batch}" + (f" (x {accum} accumulated)" if accum and accum > 1 else "")))
    optim = _literal(run, "optim", "name", ("adamw", "adafactor", "lion"))
    if optim is not None:
        text = optim
        if (lr := _value(run, "optim", "lr")) is not None:
            text += f", lr {_number(lr)}"
        if (schedule := _literal(run, "optim", "schedule", ("constant", "cosine", "linear"))) is not None:
            text += f", {schedule} schedule"
        if warmup := _value(run, "optim", "warmup_steps"):
            text += f", {warmup} warmup steps"
        if (decay := _value(run, "optim", "weight_decay")) is not None:
            text += f", weight decay {_number(decay)}"
        rows.append(("optimizer", text))
    if facts.ema:
        decay = _value(run, "optim", "ema_decay")
        rows.append(("weights", "the EMA of the trained weights" + (f" (decay {_number(decay)})" if decay else "")))
    if rows:
        lines += ["", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(lines)


def recommended_scale(facts: CardFacts) -> float:
    """The scale the run validated at (the grid's, else the config's validation.lora_scale), else 1.0."""
    if facts.grid is not None and isinstance(facts.grid.settings.get("lora_scale"), int | float):
        return float(facts.grid.settings["lora_scale"])
    scale = _value(facts.run, "validation", "lora_scale")
    return float(scale) if scale is not None else 1.0


def _top_level(adapted: Any) -> bool:
    """Whether the LoRA adapts a top-level layer (img_in, txt_in, final_layer, ...), which diffusers' kohya loader
    drops."""
    for path in adapted if isinstance(adapted, list) else ():
        try:
            if parse_module(str(path))[0].stack is None:
                return True
        except KeyError:
            continue
    return False


def _usage(facts: CardFacts) -> str:
    base, scale = facts.base, _number(recommended_scale(facts))
    prompt = ", ".join(facts.trigger_words + ("a photo",)) if facts.trigger_words else "a photo of ..."
    if facts.repo_id:
        load = f'pipe.load_lora_weights("{facts.repo_id}", weight_name="{facts.lora_file}")'
    else:
        load = f'pipe.load_lora_weights("{facts.lora_file}")  # or the Hub repo: ("org/name", weight_name=...)'
    lines = ["## Use it", "", f"Recommended LoRA scale: **{scale}**.", "", "### diffusers", ""]
    if facts.fmt == "comfy":
        lines.append(
            "This file is in ComfyUI's layout, which diffusers ignores: export a diffusers file for diffusers "
            "(`flux-jax export ... --format diffusers`)."
        )
    else:
        lines += [
            "```python",
            "import torch",
            "from diffusers import FluxPipeline",
            "",
            f'pipe = FluxPipeline.from_pretrained("{base.repo}", torch_dtype=torch.bfloat16).to("cuda")',
            load,
            "image = pipe(",
            f"    {json.dumps(prompt)},",
            f"    num_inference_steps={base.steps},",
            f"    guidance_scale={_number(base.guidance)},",
            f'    joint_attention_kwargs={{"scale": {scale}}},',
            ").images[0]",
            'image.save("image.png")',
            "```",
            "",
            f"Or merge it into the weights once, after loading: `pipe.fuse_lora(lora_scale={scale})` (then leave out "
            "`joint_attention_kwargs`).",
        ]
        if facts.fmt == "kohya" and _top_level(facts.meta.get("adapted")):
            lines.append(
                "\ndiffusers' kohya loader skips this LoRA's layers outside the blocks (img_in, txt_in, final_layer, "
                "...); a diffusers file (`--format diffusers`) carries them all."
            )
    lines += [
        "",
        "### ComfyUI",
        "",
        f"Copy `{facts.lora_file}` to `ComfyUI/models/loras/` and put a **LoraLoaderModelOnly** node (lora_name: "
        f"this file, strength_model: {scale}) between the {base.name} model loader and the sampler.",
    ]
    return "\n".join(lines)


def _validation(facts: CardFacts) -> str:
    grid = facts.grid
    if grid is None:
        return ""
    s = grid.settings
    step = str(grid.step)
    if facts.meta.get("step") is not None and facts.meta["step"] != grid.step:
        step += f" (this LoRA is step {facts.meta['step']})"
    where = path_name(str(s["base"])) if s.get("base") else "the training base"
    how = [f"`{where}`"]
    if s.get("width") and s.get("height"):
        how.append(f"{s['width']}x{s['height']}")
    for key, label in (("steps", "steps"), ("guidance", "guidance"), ("lora_scale", "LoRA scale")):
        if isinstance(s.get(key), int | float):
            how.append(f"{label} {_number(s[key])}" if key != "steps" else f"{s[key]} steps")
    if isinstance(s.get("cfg"), int | float) and s["cfg"] > 1:
        how.append(f"true CFG {_number(s['cfg'])}")
    lines = [
        "## Validation",
        "",
        f"![validation grid]({facts.grid_file})",
        "",
        f"Validation at step {step}: {', '.join(how)}; prompts down, seeds across.",
    ]
    if grid.prompts:
        lines += ["", *(f"{i}. {p}" for i, p in enumerate(grid.prompts, 1))]
    return "\n".join(lines)
