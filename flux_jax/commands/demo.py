"""`flux-jax demo`: the whole recipe end to end on a CPU, on the built-in tiny default.

1. build the tiny reference base checkpoint as a PyTorch (BFL single-file, bf16) safetensors file,
2. convert it to a Flax checkpoint (`flux-jax convert`),
3. cache the shipped demo photos into latents and text embeddings (`flux-jax cache`; tiny VAE/T5/CLIP),
4. train a LoRA on it at guidance 1.0 (`flux-jax train`),
5. export the LoRA for ComfyUI/Forge (kohya) and diffusers (`flux-jax export`),
6. sample the tiny base with and without the exported LoRA (same prompts: its first training captions; same
   seed) with the JAX sampler, and draw the pictures side by side, and the training loss curve,
and print where everything went. Re-running reuses finished steps (training resumes from its checkpoint; the
pictures are kept when the LoRA and the sampling settings are those they were drawn with).
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flux_jax.run_config import RunConfig

HELP = "run the tiny end-to-end demo: PyTorch base -> convert -> cache photos -> train LoRA -> export -> sample"
# Package data (pyproject's [tool.setuptools.package-data]), so an installed wheel has them too.
ASSETS = resources.files("flux_jax") / "assets"
DEMO_CONFIG = ASSETS / "demo.yaml"
"""The demo run config; its ``data.path`` is empty, which the demo reads as "the shipped photos"."""
DEMO_PHOTOS = ASSETS / "demo_photos"
"""8 small photos with same-named .txt captions (regenerate with ``flux_jax/assets/make_demo_photos.py``)."""
SAMPLE_PROMPTS = 4
"""Pictures per column: the first training captions."""
SAMPLE_STEPS = 8
"""Denoising steps of the pictures (the loop is compiled once whatever the count: they are cheap at this size)."""
SIDE_BY_SIDE = "demo_samples.png"
LOSS_CURVE = "demo_loss.png"
FINGERPRINT_KEY = "flux-jax demo"
"""The side-by-side PNG's text chunk recording what it was drawn from (a re-run keeps it when that matches)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo", help="where the demo writes everything (default runs/demo)")
    parser.add_argument(
        "--config",
        default=None,
        help=f"demo run config (default: the packaged {DEMO_CONFIG}); an empty data.path means the packaged photos",
    )
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="further config overrides")


@contextlib.contextmanager
def demo_config(config: str | pathlib.Path | None, overrides: Sequence[str] = ()) -> Iterator[RunConfig]:
    """The run config the demo trains with: ``config`` (default: the packaged one) plus ``overrides``, where an
    empty ``data.path`` (as the packaged config has) becomes the packaged photos. Its paths are real files for
    the duration of the ``with`` block, however the package is installed."""
    from flux_jax.run_config import load_config

    with contextlib.ExitStack() as stack:
        path = config or stack.enter_context(resources.as_file(DEMO_CONFIG))
        cfg = load_config(path, overrides)
        if not cfg.data.path and not cfg.data.synthetic:
            photos = stack.enter_context(resources.as_file(DEMO_PHOTOS))
            cfg = load_config(path, [*overrides, f"data.path={photos}"])
        yield cfg


def run(args: argparse.Namespace) -> int:
    out = pathlib.Path(args.output)
    overrides = [
        f"output_dir={out / 'run'}",
        f"data.cache_dir={out / 'cache'}",
        f"model.base={out / 'base' / 'flax'}",
        *([f"train.steps={args.steps}"] if args.steps else []),
        *args.overrides,
    ]
    with demo_config(args.config, overrides) as cfg:
        return _run(cfg, out, progress=not args.no_progress)


def _run(cfg: RunConfig, out: pathlib.Path, *, progress: bool) -> int:
    from flax import nnx

    from flux_jax.data.cache import build_cache
    from flux_jax.model.config import preset
    from flux_jax.model.flux import Flux
    from flux_jax.train.loop import train
    from flux_jax.train.lora_sources import export_lora
    from flux_jax.weights.convert import convert_checkpoint
    from flux_jax.weights.writers import write_flux_bfl

    base_pt = out / "base" / "flux-tiny-bfl-bf16.safetensors"
    base_flax = out / "base" / "flax"
    print(f"[1/6] tiny reference base (PyTorch BFL layout) -> {base_pt}")
    if not base_pt.exists():
        base_pt.parent.mkdir(parents=True, exist_ok=True)
        write_flux_bfl(Flux(preset("tiny"), rngs=nnx.Rngs(cfg.train.seed)), base_pt, dtype="bfloat16")
    print(f"[2/6] convert to a Flax checkpoint -> {base_flax}")
    if not base_flax.exists():
        convert_checkpoint(base_pt, base_flax, layout="flax", dtype="fp32", progress=progress)
    print(f"[3/6] cache {cfg.data.path} -> {cfg.data.cache_dir}")
    build_cache(cfg, progress=progress)
    print(f"[4/6] train a rank-{cfg.lora.rank} LoRA at guidance {cfg.train.guidance} for {cfg.train.steps} steps")
    result = train(cfg, progress=progress)
    print(f"[5/6] export the LoRA (step {result.step})")
    written = [
        export_lora(result.run_dir, out / f"demo_lora_{fmt}.safetensors", fmt, force=True)
        for fmt in ("kohya", "diffusers")
    ]
    print(f"final loss {result.last_loss:.4f}" if result.last_loss is not None else "no training step was needed")
    print("LoRA written to:")
    for path in written:
        print(f"  {path}")
    prompts = demo_prompts(cfg)
    size = cfg.data.resolution
    print(f"[6/6] sample the base with and without the LoRA ({len(prompts)} prompts, {size}x{size}, "
          f"{SAMPLE_STEPS} steps, seed {cfg.train.seed})")  # fmt: skip
    pictures = demo_pictures(cfg, base=base_flax, lora=written[0], run_dir=result.run_dir, out=out, prompts=prompts)
    print("pictures:")
    print(f"  base | base + LoRA  {pictures[0]}")
    print(f"  loss curve          {pictures[1] or 'none (the run logged no loss)'}")
    return 0


def demo_prompts(cfg: RunConfig, count: int = SAMPLE_PROMPTS) -> list[str]:
    """The first ``count`` training captions: the .txt files of ``data.path`` in name order when it is a folder
    with captions, else the packaged photos'."""
    folder = pathlib.Path(cfg.data.path) if cfg.data.path else None
    prompts = demo_prompts_in(folder, count) if folder is not None and folder.is_dir() else []
    if not prompts:
        with resources.as_file(DEMO_PHOTOS) as photos:
            prompts = demo_prompts_in(photos, count)
    return prompts


def demo_prompts_in(folder: pathlib.Path, count: int) -> list[str]:
    captions = [p.read_text().strip() for p in sorted(folder.glob("*.txt"))]
    return [c for c in captions if c][:count]


def _fingerprint(cfg: RunConfig, base: pathlib.Path, lora: pathlib.Path, prompts: Sequence[str]) -> str:
    """What the pictures depend on: the LoRA's tensors (the file's metadata carries a date), the base and encoders,
    the prompts and the sampling settings."""
    import hashlib
    import json

    from flux_jax.weights.safetensors_file import SafetensorsFile

    digest = hashlib.sha256()
    reader = SafetensorsFile(lora)
    for name in sorted(reader.keys()):
        digest.update(name.encode())
        digest.update(reader.array(name).tobytes())
    return json.dumps({"lora": digest.hexdigest(), "base": str(base.resolve()), "prompts": list(prompts),
                       "size": cfg.data.resolution, "steps": SAMPLE_STEPS, "seed": cfg.train.seed,
                       "guidance": cfg.train.guidance, "encoders": cfg.encoders.demo_seed})  # fmt: skip


def demo_pictures(
    cfg: RunConfig, *, base: pathlib.Path, lora: pathlib.Path, run_dir, out: pathlib.Path, prompts: Sequence[str]
) -> tuple[pathlib.Path, pathlib.Path | None]:
    """Write the base's and the LoRA's pictures of ``prompts`` side by side (one row per prompt; ``sample_pair``)
    and the run's training loss curve; (side-by-side PNG, loss curve PNG or None when the run logged no loss).
    Pictures drawn from the same LoRA tensors and settings are kept (their PNG records what they were drawn from)."""
    from flux_jax.sampling.images import loss_curve, read_png_text, side_by_side, write_png
    from flux_jax.train.metrics import METRICS_FILE

    pictures, curve = out / SIDE_BY_SIDE, out / LOSS_CURVE
    steps, losses = _losses(pathlib.Path(str(run_dir)) / METRICS_FILE)
    if losses:  # cheap (no model): drawn every time, from the whole metrics.jsonl
        write_png(curve, loss_curve(steps, losses), {"Title": "training loss", "run": str(run_dir)})
    fingerprint = _fingerprint(cfg, base, lora, prompts)
    if pictures.is_file() and read_png_text(pictures).get(FINGERPRINT_KEY) == fingerprint:
        print("  the pictures of this LoRA are there already")
        return pictures, curve if losses else None
    settings, plain, adapted = sample_pair(cfg, base=base, lora=lora, prompts=prompts)
    grid = side_by_side([[a, b] for a, b in zip(plain, adapted, strict=True)], ("base", "base + LoRA"))
    meta = {"prompts": "\n".join(prompts), "seed": str(settings.seed), "steps": str(settings.steps),
            "guidance": f"{settings.guidance:g}", "base": str(base), "lora": str(lora),
            FINGERPRINT_KEY: fingerprint}  # fmt: skip
    write_png(pictures, grid, meta)
    return pictures, curve if losses else None


def sample_pair(cfg: RunConfig, *, base: pathlib.Path, lora: pathlib.Path, prompts: Sequence[str]):
    """(settings, base images, base + LoRA images), uint8 [B, H, W, 3] each: ``prompts`` sampled at
    ``data.resolution`` for ``SAMPLE_STEPS`` steps at the training guidance, one seed (``train.seed``: the same
    initial noise) for both, on the run's mesh and dtypes with the run's encoders (the demo's generated ones unless
    configured). The LoRA is read back from the exported file, as another tool would read it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flux_jax.data.cache import DEMO_ENCODERS
    from flux_jax.data.encoding import resolve_encoder_paths
    from flux_jax.lora_io.import_ import apply_lora_file
    from flux_jax.sampling.loading import load_transformer, load_vae_for
    from flux_jax.sampling.prompts import PromptEncoder
    from flux_jax.sampling.sampler import FluxSampler, SampleSettings
    from flux_jax.sharding import make_mesh

    # One device: the sampler replicates its batch over the mesh, so more (fake CPU) devices only repeat the work.
    mesh, rules = make_mesh(1, 1, 1, devices=jax.devices()[:1]), cfg.mesh.rules
    paths, _ = resolve_encoder_paths(cfg, pathlib.Path(cfg.data.cache_dir) / DEMO_ENCODERS)
    encoder = PromptEncoder.load(paths, mesh=mesh, dtype=cfg.encoders.dtype)
    text = encoder.encode(list(prompts))
    del encoder  # the text encoders are done once the prompts are encoded
    model = load_transformer(str(base), dtype=cfg.model.base_dtype, compute_dtype=cfg.model.compute_dtype,
                             mesh=mesh, rules=rules)  # fmt: skip
    vae = load_vae_for(paths, dtype=cfg.model.compute_dtype, mesh=mesh)
    size = cfg.data.resolution
    settings = SampleSettings(width=size, height=size, steps=SAMPLE_STEPS, guidance=cfg.train.guidance,
                              seed=cfg.train.seed)  # fmt: skip
    apply_lora_file(model, lora, mesh=mesh, rules=rules)
    sampler = FluxSampler.from_model(model, vae, mesh=mesh, rules=rules)
    with_lora = sampler.images(text, settings)
    # The base alone is the same model with all-zero adapters (they add exactly 0): one compiled loop for both.
    off = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.LoRAParam))
    return settings, sampler.images(text, settings, extra=off), with_lora


def _losses(metrics: pathlib.Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of a run's metrics.jsonl (lines cut short by a kill are skipped)."""
    import json

    steps, losses = [], []
    for line in metrics.read_text().splitlines() if metrics.is_file() else ():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record.get("loss"), int | float):
            steps.append(int(record["step"]))
            losses.append(float(record["loss"]))
    return steps, losses
