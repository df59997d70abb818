"""Training checkpoints with orbax: LoRA params, optimizer state, step, RNG, data position and a JSON meta.

Layout: ``<output_dir>/checkpoints/<step>/`` with the orbax items

  ``lora``   the trainable params, a flat ``{module path: array}`` dict (what export needs); with
             ``train.mode: full`` the trained base params (each host writes its shards)
  ``ema``    their EMA, only when optim.ema_decay is set
  ``train``  ``{"step", "opt_state", "rng"}``
  ``data``   the data-iterator state ``{"epoch", "position"}`` (JSON)
  ``meta``   what the run was (JSON, see :func:`run_meta`): base config, LoRA settings, the full run config

The base model is never saved. orbax writes each step into a temporary directory and renames it when every item
is complete, so a run killed mid-save (even by SIGKILL) leaves the previous checkpoints intact and the partial
one invisible; ``latest_step`` only ever names complete checkpoints. ``checkpoints/`` itself appears with the
first save, not before.

A save that fails for want of space or permission (a full disk, a quota, a read-only mount) raises one
``CheckpointError`` naming the step and the cause; the tracebacks orbax's background threads log and print for the
same failure (and the teardown noise of their event loops) are kept off the console unless logging is at DEBUG.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from flux_jax.errors import CheckpointError
from flux_jax.model.config import FluxConfig
from flux_jax.model.flux import Flux
from flux_jax.model.lora import set_lora_training
from flux_jax.run_config import ModelConfig, RunConfig
from flux_jax.storage import run_path
from flux_jax.train.build import Adapters, lora_model
from flux_jax.train.state import TrainState, flat_params, split_trainable, unflatten

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
META_FORMAT = "flux_jax.lora_run"
META_VERSION = 1
# Settings that fix the shape or meaning of the saved state: a resumed run must not change them.
RESUME_INVARIANTS = ("rank", "alpha", "targets", "blocks", "lora_dtype", "trainable", "ema", "base_config")


_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
# How the same causes read in tensorstore's messages (orbax's array writer), which are ValueErrors.
_STORAGE_TEXTS = (
    ("No space left on device", "no space left on device"),
    ("os_error_code='28'", "no space left on device"),
    ("Disk quota exceeded", "disk quota exceeded"),
    ("Read-only file system", "the file system is read-only"),
    ("Permission denied", "permission denied"),
    ("PERMISSION_DENIED", "permission denied"),
)
# What orbax's asyncio loops and pending coroutines print when a save failed half-way or the process exits.
_TEARDOWN_NOISE = ("Event loop is closed", "cannot schedule new futures after", "Python is likely shutting down")


def storage_problem(error: BaseException) -> str | None:
    """ "no space left on device" (and the like) if ``error`` or an exception behind it is a storage failure."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            return _STORAGE_ERRNOS[e.errno]
        text = str(e)
        for needle, reason in _STORAGE_TEXTS:
            if needle in text:
                return reason
        stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return None


def _is_noise(error: BaseException | None) -> bool:
    if error is None:
        return False
    return storage_problem(error) is not None or any(n in str(error) for n in _TEARDOWN_NOISE)


def _verbose() -> bool:
    return logging.getLogger().isEnabledFor(logging.DEBUG)


class _QuietOrbax(logging.Filter):
    """Drops orbax's notice for every read-only manager and its (and asyncio's) error reports of a storage failure
    that the Checkpointer reports itself in one line; everything passes at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _verbose():
            return True
        if record.levelno == logging.WARNING and str(record.msg).startswith("Given directory is read only"):
            return False
        if record.levelno < logging.ERROR:
            return True
        if record.exc_info and _is_noise(record.exc_info[1]):
            return False
        try:
            message = record.getMessage()
        except Exception:
            return True
        return not any(n in message for n, _ in _STORAGE_TEXTS) and not any(n in message for n in _TEARDOWN_NOISE)


_quiet_installed = False


def _install_quiet_orbax() -> None:
    """Once per process: the filter on the absl and asyncio loggers, and an unraisable-exception hook that drops the
    same failures (tensorstore reports errors of its callbacks through ``sys.unraisablehook``)."""
    global _quiet_installed
    if _quiet_installed:
        return
    _quiet_installed = True
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_QuietOrbax())
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        try:
            if _is_noise(unraisable.exc_value) and not _verbose():
                return
        except Exception:
            pass
        previous(unraisable)

    sys.unraisablehook = hook


def lora_settings(cfg: RunConfig) -> dict:
    """The run's LoRA settings as stored in the meta (JSON types); for ``train.mode: full`` the mode, the trainable
    patterns and the EMA flag instead (no adapters)."""
    if cfg.train.mode == "full":
        return {"mode": "full", "trainable": list(cfg.train.trainable), "ema": cfg.optim.ema_decay is not None}
    return {
        "rank": cfg.lora.rank,
        "alpha": cfg.lora.alpha,
        "targets": cfg.lora.targets if isinstance(cfg.lora.targets, str) else list(cfg.lora.targets),
        "blocks": None if cfg.lora.blocks is None else list(cfg.lora.blocks),
        "lora_dtype": cfg.lora.dtype,
        "ema": cfg.optim.ema_decay is not None,
    }


def run_meta(cfg: RunConfig, *, base_config: FluxConfig, adapted: list[str], dataset: str, step: int) -> dict:
    """The JSON meta stored with every checkpoint (the contract ``read_lora_weights`` returns)."""
    return {
        "format": META_FORMAT,
        "version": META_VERSION,
        "step": step,
        **lora_settings(cfg),
        "adapted": adapted,
        "base": cfg.model.base or f"random:{cfg.model.preset}",
        "base_config": base_config.to_json(),
        "guidance": cfg.train.guidance,
        "guidance_range": None if cfg.train.guidance_range is None else list(cfg.train.guidance_range),
        "timestep_sampling": cfg.train.timestep_sampling,
        "steps": cfg.train.steps,
        "dataset": dataset,
        "config": cfg.to_dict(),
    }


def adapters_from_meta(meta: dict, where: str) -> Adapters:
    """The adapters a checkpoint holds, from its meta alone (not from the saved run config, whose schema may have
    changed since: the meta's LoRA keys are this module's versioned contract)."""
    try:
        targets = meta["targets"]
        blocks = meta["blocks"]
        return Adapters(
            rank=int(meta["rank"]),
            alpha=float(meta["alpha"]),
            targets=targets if isinstance(targets, str) else tuple(targets),
            blocks=None if blocks is None else tuple(int(b) for b in blocks),
            dtype=str(meta["lora_dtype"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: checkpoint meta does not describe the LoRA ({e!r})") from None


class Checkpointer:
    """An orbax CheckpointManager over ``<run_dir>/checkpoints`` with this trainer's items."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        keep: int = 3,
        async_save: bool = True,
        ema: bool = False,
        read_only: bool = False,
    ):
        _install_quiet_orbax()
        self.directory = run_path(run_dir) / CHECKPOINT_DIR  # a local path or a bucket URL (gs://)
        self.ema = ema
        self.items = ("lora", "train", "data", "meta") + (("ema",) if ema else ())
        self._pending: int | None = None  # the step of a save that may still be in flight
        self._failed = False  # a save failed and was reported: later waits stay quiet
        self._closed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save,
            create=False,  # the first save creates the directory: nothing appears before the run can start
            read_only=read_only,
            # Leftovers of a save that was killed half-way are removed when the next run starts.
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=self.items)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, *, data_state: dict, meta: dict) -> int:
        """Save (asynchronously if configured) at ``state.step``; returns the step.

        Device arrays are copied to host before this returns, so the caller may donate ``state`` right away.
        """
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return step
        args = {
            "lora": ocp.args.StandardSave(state.lora),
            "train": ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state, "rng": state.rng}),
            "data": ocp.args.JsonSave(data_state),
            "meta": ocp.args.JsonSave(dict(meta, step=step)),
        }
        if self.ema:
            args["ema"] = ocp.args.StandardSave(state.ema)
        self.wait()  # a failure of the previous (async) save surfaces here, named by its step
        try:
            self.manager.save(step, args=ocp.args.Composite(**args), force=True)
        except Exception as e:
            self._raise_storage_problem(e, step)
            raise
        self._pending = step
        return step

    def _raise_storage_problem(self, error: BaseException, step: int | None) -> None:
        """A ``CheckpointError`` (one line) if ``error`` is a storage failure; otherwise return (the caller
        re-raises)."""
        reason = storage_problem(error)
        if reason is None:
            return
        self._failed = True
        if not _verbose():
            # The failed save leaves orbax's write coroutines unfinished; Python warns about each one at exit.
            warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
        try:
            self.manager.reload()
            latest = self.manager.latest_step()
        except Exception:
            latest = None
        kept = (
            f"the earlier checkpoints are intact (latest: step {latest})"
            if latest is not None
            else "there is no earlier checkpoint"
        )
        raise CheckpointError(
            f"{self.directory}: cannot write the checkpoint of step {step}: {reason}; {kept}"
        ) from None

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict, dict]:
        """(state, data state, meta) of ``step``; ``target`` is an abstract TrainState with shardings."""
        args = {
            "lora": ocp.args.StandardRestore(target.lora),
            "train": ocp.args.StandardRestore({"step": target.step, "opt_state": target.opt_state, "rng": target.rng}),
            "data": ocp.args.JsonRestore(),
            "meta": ocp.args.JsonRestore(),
        }
        if self.ema:
            args["ema"] = ocp.args.StandardRestore(target.ema)
        try:
            got = self.manager.restore(step, args=ocp.args.Composite(**args))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.directory / str(step)}: cannot restore the training state: {first}") from e
        train = got["train"]
        state = TrainState(
            step=train["step"],
            lora=got["lora"],
            opt_state=train["opt_state"],
            ema=got["ema"] if self.ema else None,
            rng=train["rng"],
        )
        return state, got["data"], got["meta"]

    def read_meta(self, step: int) -> dict:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"{self.directory / str(step)}: cannot read the checkpoint meta: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
            raise CheckpointError(f"{self.directory / str(step)}: not a flux-jax LoRA training checkpoint")
        return meta

    def wait(self) -> None:
        """Wait for a save in flight; a storage failure of it is a ``CheckpointError`` (raised once)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            if self._failed:
                return  # already reported
            self._raise_storage_problem(e, self._pending)
            raise
        self._pending = None

    def close(self) -> None:
        """Wait for a save in flight, then release orbax's threads (its metadata writers shut down with it).
        Idempotent."""
        if self._closed:
            return
        self.wait()
        self._closed = True
        try:
            self.manager.close()
        except Exception:
            if not self._failed:
                raise


def check_resume_compatible(saved: dict, current: dict, where: str) -> None:
    """Refuse to resume a run whose LoRA or base changed (the saved tensors would not fit, or mean something else).

    Compares the ``RESUME_INVARIANTS`` present in ``current`` (so it can run before the base is built, on the
    config-level settings, and again once the base config is known). A checkpoint's ``train.mode`` must match first
    (one line); a meta without ``mode`` is a LoRA run's (written before full training existed).
    """
    saved_mode, mode = saved.get("mode", "lora"), current.get("mode", "lora")
    if saved_mode != mode:
        raise CheckpointError(
            f"{where}: cannot resume: this checkpoint is a train.mode: {saved_mode} run and the config says "
            f"train.mode: {mode}; set it back, or use a new output_dir"
        )
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}"
        for k in RESUME_INVARIANTS
        if k in current and saved.get(k) != current[k]
    ]
    if diffs:
        raise CheckpointError(
            f"{where}: cannot resume: the run's settings changed since this checkpoint:\n  "
            + "\n  ".join(diffs)
            + "\nuse a new output_dir for a different LoRA or base"
        )


# --------------------------------------------------------------------------------------------------
# Reading a run's LoRA back (the export side's entry point)


def _locate(path: epath.Path, step: int | None) -> tuple[epath.Path, int | None]:
    """(checkpoints dir, step or None for latest) from a run dir, a checkpoints dir or a checkpoints/<step> dir."""
    if (path / CHECKPOINT_DIR).is_dir():
        return path / CHECKPOINT_DIR, step
    if path.name == CHECKPOINT_DIR and path.is_dir():
        return path, step
    if path.parent.name == CHECKPOINT_DIR and path.name.isdigit() and path.is_dir():
        if step is not None and step != int(path.name):
            raise CheckpointError(f"{path}: is the checkpoint of step {path.name}, but step={step} was requested")
        return path.parent, int(path.name)
    raise CheckpointError(
        f"{path}: not a training run (no {CHECKPOINT_DIR}/ inside) nor a {CHECKPOINT_DIR}/<step> directory"
    )


def read_lora_weights(
    path: str | os.PathLike, step: int | None = None, *, use_ema: bool = False
) -> tuple[Flux, dict[str, Any]]:
    """A run's trained LoRA as a Flux model with adapters, plus the run's meta.

    path: a run directory (``output_dir``), its ``checkpoints/`` directory, or one ``checkpoints/<step>`` directory;
    local or in a bucket (gs://).
    step: which checkpoint (default: the latest complete one).
    use_ema: load the EMA weights instead (only for runs with optim.ema_decay set).

    The model has the run's base config with an *abstract* base (ShapeDtypeStructs: no base weights are read or
    allocated) and real LoRA adapters attached exactly as in training (rank, alpha, targets, blocks; per-layer
    masks included), filled from the checkpoint, in eval mode (dropout off). ``meta`` has the keys "step", "rank",
    "alpha", "targets", "base", "guidance", "timestep_sampling", "steps", "dataset", "config" (the full run
    config dict) and more (see ``run_meta``).
    """
    ckpt_dir, step = _locate(run_path(path), step)
    reader = Checkpointer(ckpt_dir.parent, read_only=True, ema=use_ema)
    try:
        step = _checkpoint_step(reader, ckpt_dir, step)
        where = str(ckpt_dir / str(step))
        meta = reader.read_meta(step)
        if use_ema and not meta.get("ema"):
            raise CheckpointError(f"{where}: the run kept no EMA (optim.ema_decay unset); use_ema=True is impossible")
        if meta.get("mode", "lora") != "lora":
            raise CheckpointError(f"{where}: a train.mode: {meta['mode']} run holds no LoRA to read (export of "
                                  "full fine-tuning runs is not supported)")  # fmt: skip
        base_cfg = FluxConfig.from_json(meta.get("base_config"), f"{where}: checkpoint meta base_config")
        adapters = adapters_from_meta(meta, where)
        # The training model's structure, abstractly: shapes and dtypes only, no base weights anywhere.
        model, _ = lora_model(base_cfg, ModelConfig(), adapters, seed=0, abstract_base=True)
        set_lora_training(model, False)
        _, lora_state, _ = split_trainable(model)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device) for k, v in flat_params(lora_state).items()
        }
        item = "ema" if use_ema else "lora"
        try:
            got = reader.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise CheckpointError(f"{where}: cannot read the LoRA weights: {e}") from e
    finally:
        reader.close()
    got = got[item]
    nnx.update(model, unflatten(lora_state, got))
    return model, meta


def read_run_meta(path: str | os.PathLike, step: int | None = None) -> tuple[epath.Path, int, dict[str, Any]]:
    """(run directory, step, meta) of a run's checkpoint, without reading any weights: what `flux-jax export`'s
    model card says about a run. ``path`` and ``step`` as for ``read_lora_weights``."""
    ckpt_dir, step = _locate(run_path(path), step)
    reader = Checkpointer(ckpt_dir.parent, read_only=True)
    try:
        step = _checkpoint_step(reader, ckpt_dir, step)
        return ckpt_dir.parent, step, reader.read_meta(step)
    finally:
        reader.close()


def _checkpoint_step(reader: Checkpointer, ckpt_dir: epath.Path, step: int | None) -> int:
    """``step`` if ``reader`` holds that complete checkpoint, the latest complete one for None; else a
    CheckpointError naming ``ckpt_dir``."""
    if step is None:
        step = reader.latest_step()
        if step is None:
            raise CheckpointError(f"{ckpt_dir}: no complete checkpoint")
    elif step not in reader.all_steps():
        raise CheckpointError(f"{ckpt_dir}: no checkpoint for step {step} (have {reader.all_steps()})")
    return step
