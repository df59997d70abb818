"""`flux-jax demo`: the whole recipe end to end on a CPU, on the built-in tiny default.

1. build the tiny reference base checkpoint as a PyTorch (BFL single-file, bf16) safetensors file,
2. convert it to a Flax checkpoint (`flux-jax convert`),
3. cache the shipped demo photos into latents and text embeddings (`flux-jax cache`; tiny VAE/T5/CLIP),
4. train a LoRA on it at guidance 1.0 (`flux-jax train`),
5. export the LoRA for ComfyUI/Forge (kohya) and diffusers (`flux-jax export`),
and print where everything went. Re-running reuses finished steps (training resumes from its checkpoint).
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

HELP = "run the tiny end-to-end demo: PyTorch base -> convert -> cache photos -> train LoRA -> export"
# Package data (pyproject's [tool.setuptools.package-data]), so an installed wheel has them too.
ASSETS = resources.files("flux_jax") / "assets"
DEMO_CONFIG = ASSETS / "demo.yaml"
"""The demo run config; its ``data.path`` is empty, which the demo reads as "the shipped photos"."""
DEMO_PHOTOS = ASSETS / "demo_photos"
"""8 small photos with same-named .txt captions (regenerate with ``flux_jax/assets/make_demo_photos.py``)."""


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
    print(f"[1/5] tiny reference base (PyTorch BFL layout) -> {base_pt}")
    if not base_pt.exists():
        base_pt.parent.mkdir(parents=True, exist_ok=True)
        write_flux_bfl(Flux(preset("tiny"), rngs=nnx.Rngs(cfg.train.seed)), base_pt, dtype="bfloat16")
    print(f"[2/5] convert to a Flax checkpoint -> {base_flax}")
    if not base_flax.exists():
        convert_checkpoint(base_pt, base_flax, layout="flax", dtype="fp32", progress=progress)
    print(f"[3/5] cache {cfg.data.path} -> {cfg.data.cache_dir}")
    build_cache(cfg, progress=progress)
    print(f"[4/5] train a rank-{cfg.lora.rank} LoRA at guidance {cfg.train.guidance} for {cfg.train.steps} steps")
    result = train(cfg, progress=progress)
    print(f"[5/5] export the LoRA (step {result.step})")
    written = [
        export_lora(result.run_dir, out / f"demo_lora_{fmt}.safetensors", fmt, force=True)
        for fmt in ("kohya", "diffusers")
    ]
    print(f"final loss {result.last_loss:.4f}" if result.last_loss is not None else "no training step was needed")
    print("LoRA written to:")
    for path in written:
        print(f"  {path}")
    return 0
