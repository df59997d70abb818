"""`flux-jax convert SRC DST`: Flux checkpoints between PyTorch layouts and Flax (orbax) checkpoint directories.

    flux-jax convert flux1-dev-fp8.safetensors dev2pro-flax --dtype bf16        # PyTorch -> Flax checkpoint
    flux-jax convert dev2pro-flax flux1-dev2pro.safetensors --layout bfl        # Flax -> BFL single file
    flux-jax convert dev2pro-flax dev2pro-diffusers --layout diffusers --shard-size 5GB
    flux-jax convert ashen0209/Flux-Dev2Pro flux1-dev2pro-bf16.safetensors --layout bfl --dtype bf16   # from the Hub

SRC is detected: a BFL single file (fp32 / bf16 / fp16 / fp8 / scaled fp8, optionally ComfyUI-prefixed), a
diffusers transformer directory, or a Flax checkpoint directory, or a Hugging Face Hub name of one
(``org/name[@revision][/path/in/repo.safetensors]``, fetched into the HF cache first; a local path of the same
spelling wins; see `flux_jax.hub`). A LoRA safetensors file (detected by its keys) is
handed to the LoRA converter (`--format`; `--config` gives it the model config for unusual widths). A tensor holding
NaN / Inf is an error naming it (`--allow-nonfinite` converts it anyway). SIGTERM stops a conversion like Ctrl-C
(the temporary output is removed); the temporaries a SIGKILLed conversion to the same DST left are removed first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import pathlib
import signal
import threading
from collections.abc import Iterator

from flux_jax import hub
from flux_jax.atomic import remove_stale_temporaries
from flux_jax.dtypes import DTYPES
from flux_jax.errors import FluxJaxError
from flux_jax.lora_io.export import convert_lora_file
from flux_jax.lora_io.formats import looks_like_lora
from flux_jax.model.config import FluxConfig
from flux_jax.weights.convert import OUTPUT_LAYOUTS, convert_checkpoint, parse_size
from flux_jax.weights.safetensors_file import SafetensorsFile
from flux_jax.weights.writers import DEFAULT_SHARD_BYTES

HELP = "convert Flux checkpoints: PyTorch (BFL, fp8, diffusers) <-> Flax checkpoint directories"
LORA_FORMATS = ("kohya", "diffusers", "comfy")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        help="checkpoint to read (file or directory; layout detected), or a Hugging Face Hub name: org/name, "
        "org/name@revision, org/name/path/in/repo.safetensors",
    )
    parser.add_argument("dst", type=pathlib.Path, help="output path (must not exist unless --force)")
    parser.add_argument(
        "--layout",
        choices=OUTPUT_LAYOUTS,
        default=None,
        help="output layout (default: flax for PyTorch inputs, bfl for Flax inputs)",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="output dtype (default: keep the stored dtype; fp8 applies to matmul kernels in Flax checkpoints)",
    )
    parser.add_argument("--force", action="store_true", help="replace DST if it exists (after the new one is complete)")
    parser.add_argument(
        "--shard-size",
        default=None,
        help=f"diffusers layout: maximum shard size, e.g. 5GB (default {DEFAULT_SHARD_BYTES // 10**9}GB)",
    )
    parser.add_argument(
        "--config", type=pathlib.Path, default=None, help="FluxConfig JSON, for unusual shapes (base or LoRA files)"
    )
    parser.add_argument("--format", choices=LORA_FORMATS, default=None, help="LoRA files only: output LoRA format")
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="write tensors holding NaN / Inf (by default the first one is an error and nothing is written)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _read_config(path: pathlib.Path | None):
    if path is None:
        return None

    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FluxJaxError(f"{path}: cannot read config JSON ({e})") from None
    return FluxConfig.from_json(raw, str(path))


def _is_lora_file(src: pathlib.Path) -> bool:
    if not src.is_file():
        return False
    with SafetensorsFile(src) as f:  # header only; a corrupt file fails here with its own clear message
        return looks_like_lora(f.keys())


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so the atomic writers remove their temporary output (Python's
    default SIGTERM ends the process on the spot and leaves a hidden partial copy of DST behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def run(args: argparse.Namespace) -> int:
    with _sigterm_interrupts():
        return _convert(args)


def _convert(args: argparse.Namespace) -> int:
    config = _read_config(args.config)
    src = pathlib.Path(hub.resolve_transformer(args.src))  # a Hub name fetched (a LoRA repository's one file too)
    if _is_lora_file(src):
        remove_stale_temporaries(args.dst)  # a conversion to DST killed earlier (SIGKILL) could not remove its own
        convert_lora_file(
            src, args.dst, args.format, args.dtype, args.force, config=config, allow_nonfinite=args.allow_nonfinite
        )
        return 0
    if args.format is not None:
        raise FluxJaxError(f"{args.src}: --format applies to LoRA files; this is a base checkpoint (use --layout)")
    shard = parse_size(args.shard_size) if args.shard_size else DEFAULT_SHARD_BYTES
    result = convert_checkpoint(
        src,
        args.dst,
        layout=args.layout,
        dtype=args.dtype,
        force=args.force,
        config=config,
        max_shard_bytes=shard,
        progress=not args.no_progress,
        allow_nonfinite=args.allow_nonfinite,
    )
    gb = result.bytes_written / 1e9
    log.info(
        "wrote %s (%s layout, dtype %s, %.2f GB) from %s (%s) in %.1f s (%.2f GB/s)",
        result.dst,
        result.layout,
        result.dtype,
        gb,
        result.src,
        result.src_layout,
        result.seconds,
        gb / max(result.seconds, 1e-9),
    )
    return 0
