"""The training loop: a ``Trainer`` composed of a compiled step, a data iterator, a checkpointer and a metrics writer.

``setup(cfg)`` takes the run directory's lease (one trainer per ``output_dir``, see ``flux_jax.train.lease``) and
builds those pieces (and the initial or resumed state) from a ``RunConfig``; ``Trainer.run(state)`` only loops:
fetch a batch, run the step, log, check for NaN, run the hooks (``Trainer.add_hook``: validation), save every N
steps, stop cleanly on SIGTERM or Ctrl-C, then closes the checkpointer and releases the lease. ``train(cfg)`` is
both. Step metrics are read one step late, so the host dispatches step n+1 before it waits for step n and the
device never idles on Python; hooks and checkpoints only see a step whose metrics were checked (a finite loss and
gradient norm, and finite LoRA parameters after the update), so a diverged step is never saved or validated. A
hook's time is not part of any step's ``step_time``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import pathlib
import time
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np
import optax
from etils import epath
from tqdm import tqdm

from flux_jax.data.cache import DEMO_ENCODERS
from flux_jax.data.encoding import TextTowers, load_text_towers, resolve_encoder_paths
from flux_jax.data.examples import (
    DataIterator,
)
from flux_jax.data.inputs import check_fits, needs_model, open_train_data, prepare_train_data
from flux_jax.data.mixing import first_cache_dir
from flux_jax.errors import CheckpointError, ConfigError, FluxJaxError
from flux_jax.hardware import peak_flops
from flux_jax.model.config import FluxConfig
from flux_jax.run_config import OptimConfig, RunConfig
from flux_jax.sharding import make_mesh, use_mesh
from flux_jax.storage import is_remote, run_path, write_text
from flux_jax.train import build
from flux_jax.train.checkpointing import Checkpointer, check_resume_compatible, lora_settings, run_meta
from flux_jax.train.lease import RunDirBusyError, RunLease
from flux_jax.train.lora_init import init_lora_from
from flux_jax.train.memory import AUTO, RematSearch, device_capacity
from flux_jax.train.metrics import MetricsWriter, useful_flops_per_sample
from flux_jax.train.objective import Objective, warn_about_guidance
from flux_jax.train.optim import build_optimizer, build_schedule
from flux_jax.train.preemption import PreemptionWatcher
from flux_jax.train.state import (
    TrainState,
    abstract_like,
    flat_params,
    init_train_state,
    split_trainable,
    trainable_for,
)
from flux_jax.train.step import StepCompiler, check_batch_split, micro_batches
from flux_jax.train.validation import build_validation, check_validation, completed, with_held_out_split

log = logging.getLogger(__name__)


class Hook(Protocol):
    """What ``Trainer.add_hook`` calls: ``hook(step, state)``; it may also have ``done(step) -> bool`` (whether it
    already ran at ``step`` in an earlier run of this run directory)."""

    def __call__(self, step: int, state: TrainState) -> None: ...


class TrainingDivergedError(FluxJaxError):
    """The loss, the gradient norm or the LoRA parameters became NaN/Inf; the run stopped and kept its last good
    checkpoint."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    run_dir: epath.Path
    """output_dir: a local path or a bucket URL."""
    step: int
    """Optimizer updates done."""
    checkpoint: epath.Path | None
    """The latest complete checkpoint directory (what export reads)."""
    preempted: bool
    """Stopped early by SIGTERM or Ctrl-C (SIGINT), after saving a checkpoint of the step it stopped at."""
    last_loss: float | None
    state: TrainState | None = None
    """The final training state (on device), for programmatic use."""
    stop_signal: str | None = None
    """"SIGTERM" or "SIGINT" when preempted."""


class Trainer:
    """Loops a compiled step over a data iterator, checkpointing and logging as it goes."""

    def __init__(
        self,
        *,
        step: StepCompiler,
        frozen: Any,
        data: DataIterator,
        grad_accum: int,
        checkpointer: Checkpointer,
        metrics: MetricsWriter,
        meta: dict,
        total_steps: int,
        checkpoint_every: int,
        log_every: int,
        schedule: optax.Schedule,
        model_cfg: FluxConfig,
        rules: Any,
        peak_tflops: float | None = None,
        progress: bool = True,
        lease: RunLease | None = None,
    ):
        self.lease = lease
        self.step = step
        self.frozen = frozen
        self.data = data
        self.grad_accum = grad_accum
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.meta = meta
        self.total_steps = total_steps
        self.checkpoint_every = checkpoint_every
        self.log_every = log_every
        self.schedule = schedule
        self.model_cfg = model_cfg
        self.rules = rules
        self.progress = progress
        self.mesh = step.mesh
        self.peak = peak_flops(self.mesh.devices.flat[0], peak_tflops)
        self._bar: tqdm | None = None
        self._closed = False
        self._last_time: float | None = None
        self._data_wait = 0.0  # seconds spent in the data iterator since _last_time
        self.last_loss: float | None = None
        self.hooks: list[tuple[Hook, int]] = []

    def add_hook(self, hook: Hook, *, every: int) -> None:
        """Call ``hook(step, state)`` at every ``every``-th step and at the last one (Levanter's ``add_hook``).

        It runs after that step's metrics were checked and before its checkpoint is saved: a run killed in
        between does it again once resumed, one killed after the save has it. At a stop signal's step it is
        skipped, so the save is quick. A run also calls it before its first step, at the step it starts from
        (0 when fresh), if that step is due and ``hook.done(step)`` says it did not run there (a hook without
        ``done`` is called there only at step 0). The hook must not change ``state``: the next step donates it.
        """
        if every < 1:
            raise ValueError(f"a hook's every must be >= 1, got {every}")
        self.hooks.append((hook, every))

    def _due(self, step: int) -> list[Hook]:
        return [hook for hook, every in self.hooks if step % every == 0 or step == self.total_steps]

    def _run_hooks(self, step: int, state: TrainState, hooks: Sequence[Hook]) -> None:
        for hook in hooks:
            hook(step, state)
        # The hooks' time is theirs: the next step's step_time starts now (it was not dispatched yet).
        self._restart_clock()

    def _restart_clock(self) -> None:
        self._last_time = time.perf_counter()
        self._data_wait = 0.0

    def _catch_up(self, start: int, state: TrainState) -> None:
        """The hooks due at the starting step that have not run there (see ``add_hook``)."""
        missing = []
        for hook in self._due(start):
            done = getattr(hook, "done", None)
            if (done is None and start == 0) or (done is not None and not done(start)):
                missing.append(hook)
        if missing:
            with use_mesh(self.mesh, self.rules):
                self._run_hooks(start, state, missing)

    def to_device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Global arrays from this host's rows (on one host: a plain sharded device_put)."""
        return {k: jax.make_array_from_process_local_data(self.step.batch_sharding, v) for k, v in batch.items()}

    def run(self, state: TrainState) -> TrainResult:
        """Train to ``total_steps`` (or a stop signal), then close the trainer (see ``close``), however it ends."""
        try:
            step, stop_signal, state = self._run(state)
            self.checkpointer.wait()  # the last save completes (or fails, loudly) before the result names it
            return self._result(step, stop_signal, state)
        finally:
            self.close()

    def close(self) -> None:
        """Let a save in flight finish (after a NaN or a crash it is the last good checkpoint), close the
        checkpointer and the metrics, then release the run directory's lease: in that order, so that nothing is
        written after the lease is gone and orbax's writers are not shut down under a save. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.checkpointer.close()
        finally:
            try:
                self.metrics.close()
            finally:
                if self._bar is not None:
                    self._bar.close()
                if self.lease is not None:
                    self.lease.release()

    def _run(self, state: TrainState) -> tuple[int, str | None, TrainState]:
        start = int(jax.device_get(state.step))
        stop_signal = None
        self._catch_up(start, state)
        if start >= self.total_steps:
            log.info("nothing to do: the run is already at step %d of %d", start, self.total_steps)
            return start, stop_signal, state
        log.info("training steps %d..%d (%s)", start + 1, self.total_steps, self.meta["dataset"])
        self._bar = tqdm(
            total=self.total_steps,
            initial=start,
            desc="train",
            dynamic_ncols=True,
            disable=not self.progress or jax.process_index() != 0,
        )
        pending = None
        step = start
        with use_mesh(self.mesh, self.rules), PreemptionWatcher() as watcher:
            for step in range(start + 1, self.total_steps + 1):
                if self.lease is not None:
                    self.lease.check()  # another trainer took the run directory over: write nothing more
                fetch = time.perf_counter()
                batch = micro_batches(next(self.data), self.grad_accum, self.step.keys)
                self._data_wait += time.perf_counter() - fetch
                data_state = self.data.get_state()
                compiles = not self.step.has_executable(batch)  # the first step, or a new bucket shape
                if compiles and pending is not None:  # keep the compile out of the previous step's time
                    self._complete(*pending)
                    pending = None
                state, metrics = self.step(self.frozen, state, self.to_device(batch))
                if compiles:
                    self._restart_clock()
                if pending is not None:
                    self._complete(*pending)
                pending = (step, metrics, batch, data_state)
                stop = watcher.should_stop(step)
                hooks = [] if stop else self._due(step)  # a stop saves at once
                save = step % self.checkpoint_every == 0 or step == self.total_steps or stop
                if hooks or save:
                    self._complete(*pending)  # hooks and saves see a step whose metrics were checked
                    pending = None
                if hooks:
                    self._run_hooks(step, state, hooks)  # before the save: see add_hook
                    if not save:
                        self.metrics.sync()
                if save:
                    self.checkpointer.save(state, data_state=data_state, meta=self.meta)
                    self.metrics.sync()  # a bucket run dir gets its logs at each checkpoint
                if stop:
                    stop_signal = watcher.signal_name or "SIGTERM"
                    log.warning(
                        "stopped at step %d on %s; checkpoint saved to %s, exiting cleanly",
                        step,
                        stop_signal,
                        self.checkpointer.directory / str(step),
                    )
                    break
            if pending is not None:
                self._complete(*pending)
        return step, stop_signal, state

    def _result(self, step: int, stop_signal: str | None, state: TrainState) -> TrainResult:
        latest = self.checkpointer.latest_step()
        return TrainResult(
            run_dir=self.checkpointer.directory.parent,
            step=step,
            checkpoint=None if latest is None else self.checkpointer.directory / str(latest),
            preempted=stop_signal is not None,
            last_loss=self.last_loss,
            state=state,
            stop_signal=stop_signal,
        )

    def _last_good(self) -> str:
        self.checkpointer.wait()
        latest = self.checkpointer.latest_step()
        return f"step {latest} in {self.checkpointer.directory}" if latest is not None else "none"

    def _complete(
        self, step: int, metrics: dict[str, jax.Array], batch: dict[str, np.ndarray], data_state: dict[str, Any]
    ) -> None:
        """Wait for ``step``'s metrics, refuse NaN/Inf, then log them."""
        values = jax.device_get(metrics)
        now = time.perf_counter()
        dt = now - (self._last_time or now)
        # The host fetches step n+1's batch while the device runs step n, so the fetches inside this interval are
        # what the device may have waited for: their share of it is the input pipeline's cost (0 = it keeps up).
        data_wait, self._data_wait = self._data_wait, 0.0
        self._last_time = now
        loss, grad_norm = float(values["loss"]), float(values["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise TrainingDivergedError(
                f"loss is {loss} (gradient norm {grad_norm}) at step {step}; stopping. "
                f"Last good checkpoint: {self._last_good()}"
            )
        if not bool(values["params_finite"]):
            raise TrainingDivergedError(
                f"the LoRA parameters are not finite (NaN/Inf) after the update of step {step} (loss {loss}, "
                f"gradient norm {grad_norm}; is optim.lr too large?); stopping. "
                f"Last good checkpoint: {self._last_good()}"
            )
        self.last_loss = loss
        micro, rows, img_tokens = batch["latents"].shape[:3]
        samples = micro * rows * jax.process_count()
        txt_tokens = batch["t5" if "t5" in batch else "t5_ids"].shape[2]
        record: dict[str, float | int | None] = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": float(self.schedule(step - 1)),
        }
        if dt > 0:
            flops = useful_flops_per_sample(self.model_cfg, img_tokens, txt_tokens) * samples
            record.update(
                step_time=dt,
                samples_per_s=samples / dt,
                tokens_per_s=samples * (img_tokens + txt_tokens) / dt,
                mfu=flops / dt / (self.peak * self.mesh.size) if self.peak else None,
                data_wait=data_wait,
                data_wait_fraction=min(1.0, data_wait / dt),
            )
        # Where the data iterator stands after this step (resume tests compare these).
        record.update({f"data_{k}": v for k, v in data_state.items() if k in ("epoch", "position", "next_batch")})
        if step % self.log_every == 0 or step == self.total_steps:
            self.metrics.write(step, record)
        if self._bar is not None:
            self._bar.update(1)
            postfix = {"loss": f"{loss:.4f}"}
            if dt > 0:
                postfix.update({"s/step": f"{dt:.3f}", "samples/s": f"{samples / dt:.1f}"})
            self._bar.set_postfix(postfix)


def take_lease(run_dir: epath.Path) -> RunLease | None:
    """The run directory's lease, held by process 0 for the whole run; every process raises ``RunDirBusyError``
    when process 0 could not take it (so none of them goes on to build the model)."""
    lease, refusal = None, None
    if jax.process_index() == 0:
        lease = RunLease(run_dir)
        try:
            lease.acquire()
        except RunDirBusyError as e:
            lease, refusal = None, e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)))
        if refused and refusal is None:
            raise RunDirBusyError(f"{run_dir}: process 0 could not take the run directory's lease (its log says why)")
    if refusal is not None:
        raise refusal
    return lease


def _optim_changes(saved_meta: dict, cfg: RunConfig) -> list[str]:
    saved = (saved_meta.get("config") or {}).get("optim") or {}
    now = cfg.to_dict()["optim"]
    # A key the checkpoint lacks is newer than it: that run had the key's default.
    defaults = dataclasses.replace(cfg, optim=OptimConfig()).to_dict()["optim"]
    return [
        f"optim.{k}: checkpoint {saved.get(k, defaults[k])!r}, now {v!r}"
        for k, v in now.items()
        if saved.get(k, defaults[k]) != v
    ]


def online_text(cfg: RunConfig, *, mesh: Any, rules: Any, model_cfg: FluxConfig) -> tuple[TextTowers, dict]:
    """``encoders.online``: T5 and CLIP, loaded once and placed on the mesh by the run's rules (the encoders the
    cache was built with: the same paths, or the same generated demo encoders in the cache dir)."""
    paths, _ = resolve_encoder_paths(cfg, first_cache_dir(cfg) / DEMO_ENCODERS)
    log.info("encoders.online: loading T5 %s and CLIP %s (%s) into the train step", paths.t5, paths.clip,
             cfg.encoders.dtype)  # fmt: skip
    text, weights = load_text_towers(paths, mesh=mesh, rules=rules, dtype=cfg.encoders.dtype)
    got, want = (text.t5_dim, text.clip_dim), (model_cfg.context_in_dim, model_cfg.vec_in_dim)
    if got != want:
        raise ConfigError(
            f"encoders.online: the text encoders ({paths.t5}, {paths.clip}) give T5 / CLIP widths {got}, the model "
            f"takes {want}; set encoders.root to the base's FLUX.1 download",
            key="encoders",
        )
    return text, weights


def setup(
    cfg: RunConfig,
    *,
    devices: Sequence[jax.Device] | None = None,
    progress: bool = True,
    architecture: FluxConfig | None = None,
) -> tuple[Trainer, TrainState]:
    """Build the trainer and its starting state (fresh, or resumed from the latest checkpoint in output_dir).

    First takes the run directory's lease (``RunDirBusyError`` while another trainer uses output_dir, before
    anything is built); the returned trainer holds it until ``Trainer.run`` ends (or ``Trainer.close``); a setup
    that fails releases it. ``architecture``: a random base of this shape instead of ``model.preset``'s (benchmarks
    at reduced depth).
    """
    cfg.validate_for_training(require_data=not cfg.data.synthetic)
    mesh = make_mesh(*cfg.mesh.shape, devices=devices)
    rules = cfg.mesh.rules
    check_batch_split(cfg.train.batch_size, cfg.train.grad_accum, mesh, jax.process_count())
    run_dir = run_path(cfg.output_dir)
    seed = cfg.train.seed
    ema = cfg.optim.ema_decay is not None
    with contextlib.ExitStack() as undo:  # run on failure only: the trainer owns these once it exists
        # One trainer per run directory, decided before anything else touches it (the checkpointer removes the
        # leftovers of interrupted saves, which would be another trainer's saves in flight).
        lease = take_lease(run_dir)
        if lease is not None:
            undo.callback(lease.release)
        # Everything that can fail fast is checked before the (possibly 12B-parameter) base is built, and the
        # cheap checks before caching (which can take hours on a large folder).
        validation_inputs = check_validation(cfg)
        # Images without a complete latent cache are cached first (what `flux-jax cache` does, on every process:
        # the build is collective); the encoders are freed before the base arrives.
        if prepare_train_data(cfg, progress=progress, devices=devices) is not None:
            gc.collect()  # T5-XXL is ~9 GB in bf16; the encoders' arrays go with their modules' reference cycles
        data, source = (None, None) if needs_model(cfg) else open_train_data(cfg)
        validation_inputs = with_held_out_split(cfg, validation_inputs)  # the caches are complete now
        checkpointer = Checkpointer(run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save, ema=ema)
        undo.callback(checkpointer.close)
        latest = checkpointer.latest_step()
        init_from = cfg.lora.init_from
        if init_from and latest is None and not is_remote(init_from) and not pathlib.Path(init_from).exists():
            raise ConfigError(f"{init_from}: no such LoRA file or training run", key="lora.init_from")
        saved_meta = None
        if latest is not None:
            saved_meta = checkpointer.read_meta(latest)
            check_resume_compatible(saved_meta, lora_settings(cfg), str(checkpointer.directory / str(latest)))

        with use_mesh(mesh, rules):
            # train.mode: full builds no adapters and trains the base's own (fp32 master) params instead.
            lora_cfg = None if cfg.train.mode == "full" else cfg.lora
            model, adapted = build.build_model(
                cfg.model, lora_cfg, mesh=mesh, rules=rules, seed=seed, architecture=architecture
            )
        model_cfg: FluxConfig = model.config
        if init_from and latest is None:  # a resumed run continues from its checkpoint instead
            init_lora_from(model, init_from)
        objective = Objective.from_config(cfg.train)
        warn_about_guidance(objective, base=cfg.model.base, config=model_cfg)
        if data is None:
            data, source = open_train_data(cfg, model_cfg)
        check_fits(source, model_cfg)
        graphdef, lora_state, frozen = split_trainable(model, trainable_for(cfg.train))
        template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lora_state)
        tx = build_optimizer(cfg.optim, cfg.train.steps)  # accumulation happens inside the step
        state, shardings = init_train_state(flat_params(lora_state), tx, seed=seed, ema=ema, mesh=mesh)
        del lora_state, model
        # Frozen step arguments beside the base, never in the train state: neither optimized nor checkpointed.
        text, encoder_weights = (
            online_text(cfg, mesh=mesh, rules=rules, model_cfg=model_cfg) if cfg.encoders.online else (None, None)
        )
        meta = run_meta(cfg, base_config=model_cfg, adapted=adapted, dataset=source.describe(), step=0)
        if latest is not None:
            where = str(checkpointer.directory / str(latest))
            check_resume_compatible(saved_meta, meta, where)  # now with the base config
            try:
                state, data_state, _ = checkpointer.restore(latest, abstract_like(state, shardings))
            except CheckpointError:
                changed = _optim_changes(saved_meta, cfg)
                if not changed:
                    raise
                raise CheckpointError(
                    f"{where}: cannot resume: the optimizer settings changed since this checkpoint "
                    f"({'; '.join(changed)}) and its optimizer state does not fit them; set them back, "
                    f"or start a new run in another output_dir"
                ) from None
            data.set_state(data_state)
            log.info("resuming from %s (step %d, data %s)", where, latest, data_state)
        compiler = StepCompiler(
            graphdef=graphdef,
            template=template,
            frozen=frozen,
            state_shardings=shardings,
            tx=tx,
            objective=objective,
            ema_decay=cfg.optim.ema_decay,
            master_dtype=cfg.optim.master_dtype,
            mesh=mesh,
            remat=RematSearch(capacity=device_capacity(mesh.devices.flat[0])) if cfg.model.remat == AUTO else None,
            text=text,
            encoders=encoder_weights,
        )
        is_main = jax.process_index() == 0
        if is_main and (latest or 0) < cfg.train.steps:  # a run with nothing left to do leaves its files alone
            write_text(run_dir / "config.yaml", cfg.to_yaml())
        metrics = MetricsWriter(
            run_dir, tensorboard=cfg.log.tensorboard, resume_step=latest or 0, enabled=is_main,
            wandb=cfg.log.wandb, config=cfg.to_dict(),
        )  # fmt: skip
        undo.callback(metrics.close)
        validation = None
        # A finished run builds nothing for validation, unless its last validation is missing (a stop signal at
        # the last step skips it; see Trainer.add_hook).
        if validation_inputs is not None and ((latest or 0) < cfg.train.steps or not completed(run_dir, latest or 0)):
            with use_mesh(mesh, rules):
                validation = build_validation(
                    cfg,
                    validation_inputs,
                    mesh=mesh,
                    rules=rules,
                    graphdef=graphdef,
                    template=template,
                    frozen=frozen,
                    model_cfg=model_cfg,
                    objective=objective,
                    metrics=metrics,
                )
        trainer = Trainer(
            step=compiler,
            frozen=frozen,
            data=data,
            grad_accum=cfg.train.grad_accum,
            checkpointer=checkpointer,
            metrics=metrics,
            meta=meta,
            total_steps=cfg.train.steps,
            checkpoint_every=cfg.checkpoint.every,
            log_every=cfg.log.every,
            schedule=build_schedule(cfg.optim, cfg.train.steps),
            model_cfg=model_cfg,
            rules=rules,
            peak_tflops=cfg.log.peak_tflops,
            progress=progress,
            lease=lease,
        )
        if validation is not None:
            trainer.add_hook(validation, every=cfg.validation.every)
        undo.pop_all()
        return trainer, state


def train(cfg: RunConfig, *, devices: Sequence[jax.Device] | None = None, progress: bool = True) -> TrainResult:
    trainer, state = setup(cfg, devices=devices, progress=progress)
    return trainer.run(state)
