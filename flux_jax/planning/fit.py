"""Does a training run fit a TPU slice? Compile its real step for the slice and read XLA's numbers.

``plan(cfg, target)`` builds the trainer's step on abstract, sharded arguments (``flux_jax.train.abstract``) over the
target's compile-only devices, compiles it ahead of time for that TPU, and returns a :class:`Plan`:

- per-chip HBM from ``compiled.memory_analysis()``: arguments (the base shard, LoRA, optimizer state, batch),
  outputs, temporaries (activations, gathered weights), minus outputs aliasing donated inputs; the step fits when
  that total is within the chip's HBM. When the TPU compiler itself runs out of HBM it refuses to compile; the
  plan then reports its "used / available" figures and does not fit.
- with validation on (a ``validation`` section with prompts and ``every`` >= 1), the sampler's denoising loop is
  compiled for the same devices too, and its VAE decode for this machine's CPU (``planning.validation``):
  validation's resident memory (a validation base other than the training base, the VAE decoder, the encoded
  prompts) is held throughout, and the sampler's peak happens between steps, so the run needs the step's arguments
  + validation's resident memory + max(the step's own peak, the sampler's): ``Plan.total``, which is what the plan
  checks against the chip's HBM.
- FLOPs: XLA's ``cost_analysis()`` counts a loop body once, and the model runs its blocks in scanned loops, so the
  per-chip matmul FLOPs of a step are counted from the compiled HLO with every loop counted as many times as it
  runs (``hlo_flops``). The step-time estimate is those FLOPs at the chip's peak FLOP/s: a floor (100% of peak;
  divide by the MFU you expect). XLA's own ``optimal_seconds`` is reported as is; for the full Flux step this
  libtpu returns a negative value (no estimate), and where it is positive it still counts each loop body once.
- a time estimate per chip (``hlo_traffic``, from the same HLO, every loop iteration): the bytes the step moves to
  and from HBM and sends over ICI in collectives, at the generation's bandwidths (``hardware.GENERATIONS``):
  max(FLOPs / peak, HBM bytes / HBM bandwidth) + ICI bytes / ICI bandwidth, the collectives taken as not
  overlapped with compute. An estimate, not a measurement.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from typing import Any

from flux_jax import hub
from flux_jax.errors import FluxJaxError
from flux_jax.flow import packed_seq_len
from flux_jax.model.attention import describe_attention
from flux_jax.model.config import PRESETS, FluxConfig
from flux_jax.planning import hlo_flops, hlo_traffic
from flux_jax.planning.topology import TpuTarget, devices, peak_flops
from flux_jax.planning.validation import (
    ValidationMemory,
    ValidationSpec,
    plan_validation,
    report_lines,
    validation_spec,
)
from flux_jax.run_config import RunConfig
from flux_jax.train.memory import AUTO, NoRematFits, RematOption, RematSearch, memory_summary, parse_oom
from flux_jax.train.state import StateBytes, state_bytes

log = logging.getLogger(__name__)

# T5 tokens per caption in the cached dataset (FLUX.1-dev: 512; EncodersConfig.t5_max_length).
DEFAULT_TEXT_LEN = 512


class PlanError(FluxJaxError):
    """The step could not be compiled for the target for a reason other than memory."""


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-chip bytes of one step (``memory_analysis()``); ``total`` is the peak the step needs."""

    argument: int
    output: int
    temp: int
    alias: int
    total: int
    from_compiler_error: bool = False
    """True when the compiler refused the program (out of HBM) and only reported its total."""


@dataclasses.dataclass(frozen=True)
class Plan:
    target: TpuTarget
    model: str
    """The architecture planned: a preset name or the base checkpoint's path."""
    mesh: dict[str, int]
    batch_size: int
    grad_accum: int
    resolution: int
    text_len: int
    base_dtype: str
    remat: str
    """The remat policy of the planned step (with ``model.remat: auto``, the one chosen)."""
    attention: str
    memory: Memory
    capacity: int
    """Per-chip HBM bytes the plan is checked against."""
    flops: float | None
    """Per-chip matmul FLOPs of one step, every loop iteration counted (None when not compiled)."""
    xla_flops: float | None
    """``cost_analysis()["flops"]``: loop bodies counted once."""
    xla_optimal_seconds: float | None
    """``cost_analysis()["optimal_seconds"]`` (loop bodies once); None where XLA gives no (a negative) estimate."""
    seconds_at_peak: float | None
    """Matmul FLOPs at the chip's peak FLOP/s: the time no schedule can beat."""
    peak_flops: float | None
    compile_seconds: float
    notes: tuple[str, ...] = ()
    validation: ValidationMemory | None = None
    """What validation during training adds (None when it is off or was not planned)."""
    remat_options: tuple[RematOption, ...] = ()
    """With ``model.remat: auto``: every policy compiled, with its per-chip memory (empty for a fixed policy)."""
    hbm_traffic: float | None = None
    """Estimated per-chip HBM bytes one step reads and writes, every loop iteration (``hlo_traffic``)."""
    collective_bytes: dict[str, float] | None = None
    """Per-chip bytes one step sends over ICI, by collective kind (ring costs, every loop iteration)."""
    train_state: StateBytes | None = None
    """The TrainState (LoRA params, optimizer state, EMA) per chip under its shardings, and were it replicated."""

    @property
    def hbm_seconds(self) -> float | None:
        """The HBM traffic at the chip's HBM bandwidth."""
        return None if self.hbm_traffic is None else self.hbm_traffic / self.target.generation.hbm_bandwidth

    @property
    def ici_bytes(self) -> float | None:
        return None if self.collective_bytes is None else sum(self.collective_bytes.values())

    @property
    def ici_seconds(self) -> float | None:
        """The collective bytes at the chip's ICI bandwidth (one way, every link)."""
        return None if self.ici_bytes is None else self.ici_bytes / self.target.generation.ici_bandwidth

    @property
    def estimate_seconds(self) -> float | None:
        """max(compute, HBM) + ICI: compute and memory traffic overlap, collectives are taken as exposed."""
        parts = (self.seconds_at_peak, self.hbm_seconds, self.ici_seconds)
        if any(x is None for x in parts):
            return None
        return max(self.seconds_at_peak, self.hbm_seconds) + self.ici_seconds

    @property
    def total(self) -> int:
        """Per-chip bytes the run needs: the step's, or with validation the step's arguments + validation's
        resident memory + the larger of the step's own peak and the sampler's (they never overlap)."""
        m, v = self.memory, self.validation
        if v is None or m.from_compiler_error:
            return m.total
        return m.argument + v.resident + max(m.total - m.argument, v.peak)

    @property
    def fits(self) -> bool:
        sampler_refused = self.validation is not None and self.validation.from_compiler_error
        refused = self.memory.from_compiler_error or sampler_refused
        return not refused and self.total <= self.capacity

    @property
    def per_chip_batch(self) -> float:
        return self.batch_size / self.target.chips

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["target"] = {"name": self.target.name, "topology": self.target.topology, "chips": self.target.chips,
                         "hbm_gib": self.target.generation.hbm_gib}  # fmt: skip
        out["fits"] = self.fits
        out["total"] = self.total
        for key in ("hbm_seconds", "ici_bytes", "ici_seconds", "estimate_seconds"):
            out[key] = getattr(self, key)
        out["notes"] = list(self.notes)
        return out


def resolve_model(cfg: RunConfig) -> tuple[FluxConfig, str, tuple[str, ...]]:
    """The base architecture to plan: ``model.preset``, else the config of ``model.base`` if it is on this machine,
    else Flux.1-dev's (the recipe's Dev2Pro base has it); the planner never needs the weights themselves."""
    if cfg.model.preset is not None:
        if cfg.model.preset not in PRESETS:
            raise FluxJaxError(f"model.preset {cfg.model.preset!r} is not one of {sorted(PRESETS)}")
        return PRESETS[cfg.model.preset], cfg.model.preset, ()
    local = hub.resolve_transformer(cfg.model.base, download=False) if cfg.model.base else ""  # a Hub name if cached
    if local and pathlib.Path(local).exists():
        from flux_jax.weights.checkpoint import open_checkpoint

        with open_checkpoint(local) as ckpt:
            return ckpt.config, cfg.model.base, ()
    note = (f"model.base {cfg.model.base!r} is not on this machine: planned the Flux.1-dev architecture "
            "(Dev2Pro's); set model.preset to plan another")  # fmt: skip
    return PRESETS["dev"], "dev", (note,)


FROM_CONFIG = "config"


def plan(cfg: RunConfig, target: TpuTarget, *, text_len: int = DEFAULT_TEXT_LEN, hbm_bytes: int | None = None,
         validation: ValidationSpec | None | str = FROM_CONFIG, remat_first_fit: bool = False) -> Plan:  # fmt: skip
    """Compile ``cfg``'s training step (and its validation sampler) for ``target`` and measure them (see the module
    docstring). ``validation``: the validation settings to plan, None for none; by default the config's.
    ``remat_first_fit``: with ``model.remat: auto``, stop at the first policy that fits, as the trainer does,
    instead of compiling all three for the report (a third to a half of the compile time of a large plan)."""
    import jax

    from flux_jax.sharding import make_mesh
    from flux_jax.train.abstract import abstract_step

    model_config, model_name, notes = resolve_model(cfg)
    if validation == FROM_CONFIG:
        validation, more = validation_spec(cfg)
        notes = (*notes, *more)
    devs = devices(target)
    mesh = make_mesh(*cfg.mesh.shape, devices=devs)
    capacity = target.hbm_bytes if hbm_bytes is None else hbm_bytes
    # remat auto: every policy is compiled for the report; the run uses the first that fits, as train would.
    search = RematSearch(capacity=capacity, evaluate_all=not remat_first_fit) if cfg.model.remat == AUTO else None
    step = abstract_step(cfg, mesh, model_config=model_config, remat=search)
    notes = (*notes, *step.notes)
    batch = step.batch(batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
                       resolution=cfg.data.resolution, text_len=text_len)  # fmt: skip
    peak = peak_flops(target, devs[0])
    common = dict(target=target, model=model_name, mesh=dict(mesh.shape), batch_size=cfg.train.batch_size,
                  grad_accum=cfg.train.grad_accum, resolution=cfg.data.resolution, text_len=text_len,
                  base_dtype=cfg.model.base_dtype, attention=describe_attention(cfg.model.attention, step.attention),
                  capacity=capacity, peak_flops=peak, train_state=state_bytes(step.state))  # fmt: skip
    log.info("compiling the train step for %s (%s, mesh %s, batch %d at %d px); this can take minutes",
             target.name, target.topology, dict(mesh.shape), cfg.train.batch_size, cfg.data.resolution)  # fmt: skip
    start = time.perf_counter()
    refusal = None
    try:
        compiled = step.compile(batch)
    except NoRematFits as e:
        need = min(o.total for o in e.options)
        refusal = (need, f"the TPU compiler ran out of HBM under every remat policy ({e})", "full", e.options)
    except jax.errors.JaxRuntimeError as e:
        oom = parse_oom(str(e))
        if oom is None:
            raise PlanError(f"compiling the step for {target.topology} failed: {str(e).strip()[:2000]}") from None
        note = (f"the TPU compiler ran out of HBM: the step needs {_gib(oom[0])} per chip, the compiler can use "
                f"{_gib(oom[1])}")  # fmt: skip
        refusal = (oom[0], note, cfg.model.remat, ())
    if refusal is not None:
        need, note, remat, options = refusal
        memory = Memory(argument=0, output=0, temp=0, alias=0, total=need, from_compiler_error=True)
        if validation is not None:
            note += "; validation was not planned"
        return Plan(memory=memory, flops=None, xla_flops=None, xla_optimal_seconds=None, seconds_at_peak=None,
                    compile_seconds=time.perf_counter() - start, notes=(*notes, note), remat=remat,
                    remat_options=options, **common)  # fmt: skip
    seconds = time.perf_counter() - start
    common.update(remat=step.compiler.remat_policy, remat_options=step.compiler.remat_options)
    gib = memory_summary(compiled)
    if gib is None:
        raise PlanError(f"the compiled step for {target.topology} has no memory analysis")
    b = {k: int(round(v * 2**30)) for k, v in gib.items()}
    memory = Memory(argument=b["argument"], output=b["output"], temp=b["temp"], alias=b["alias"], total=b["total"])
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, list | tuple) else (cost or {})
    xla_flops, optimal = cost.get("flops"), cost.get("optimal_seconds")
    if optimal is not None and optimal < 0:  # XLA's "no estimate" (negative for the Flux step)
        optimal = None
    text = compiled.as_text()
    count = hlo_flops.count_flops(text)
    if count.unknown_loops:
        notes = (*notes, f"{count.unknown_loops} loop(s) with an unreadable trip count were counted once")
    traffic = hlo_traffic.count_traffic(text)
    if traffic.unknown_groups:
        notes = (*notes, f"{traffic.unknown_groups} collective(s) with unreadable replica groups were counted as "
                 "spanning every chip")  # fmt: skip
    sampler = None
    if validation is not None:
        log.info("compiling the validation sampler (%d images at %dx%d)", validation.images, validation.width,
                 validation.height)  # fmt: skip
        start = time.perf_counter()
        sampler, more = plan_validation(cfg, validation, mesh, model_config=model_config, text_len=text_len)
        seconds += time.perf_counter() - start
        notes = (*notes, *more)
    return Plan(memory=memory, flops=count.flops, xla_flops=xla_flops, xla_optimal_seconds=optimal,
                seconds_at_peak=count.flops / peak if peak else None,
                compile_seconds=seconds, notes=notes, validation=sampler, hbm_traffic=traffic.hbm_bytes,
                collective_bytes=traffic.collective_bytes, **common)  # fmt: skip


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _estimate_lines(p: Plan) -> list[str]:
    if p.estimate_seconds is None:
        return []
    g = p.target.generation
    kinds = ", ".join(f"{kind} {n / 1e9:.4g} GB" for kind, n in (p.collective_bytes or {}).items() if n)
    return [
        "",
        "time estimate per chip and step (an estimate, not a measurement; collectives assumed exposed)",
        f"  compute      {p.seconds_at_peak:.3g} s (matmul FLOPs at peak)",
        f"  HBM          {p.hbm_seconds:.3g} s ({p.hbm_traffic / 1e9:.4g} GB read and written at "
        f"{g.hbm_bandwidth / 1e9:.0f} GB/s)",
        f"  ICI          {p.ici_seconds:.3g} s ({p.ici_bytes / 1e9:.4g} GB sent at {g.ici_bandwidth / 1e9:.0f} GB/s)",
        f"  estimate     {p.estimate_seconds:.3g} s = max(compute, HBM) + ICI",
        f"  collectives  {kinds or 'none'}",
    ]


def format_report(p: Plan) -> str:
    """The human-readable report ``flux-jax plan`` prints."""
    t = p.target
    mesh = " x ".join(f"{k} {v}" for k, v in p.mesh.items())
    lines = [
        f"target     {t.name} ({t.topology}, {t.chips} chips, {t.generation.hbm_gib} GiB HBM per chip)",
        f"model      {p.model}, base {p.base_dtype}, remat {p.remat}{' (auto)' if p.remat_options else ''}, "
        f"attention {p.attention}",
        f"mesh       {mesh}",
        f"batch      {p.batch_size} global ({p.per_chip_batch:g} per chip) in {p.grad_accum} micro-batch(es), "
        f"{p.resolution} px ({packed_seq_len(p.resolution, p.resolution)} image + {p.text_len} text tokens)",
        f"compile    {p.compile_seconds:.0f} s",
        "",
        "per-chip HBM",
    ]
    m = p.memory
    if m.from_compiler_error:
        lines.append(f"  total        {_gib(m.total)} (the compiler's figure; it refused the program)")
    else:
        lines += [
            f"  arguments    {_gib(m.argument)}",
            f"  outputs      {_gib(m.output)}",
            f"  temporaries  {_gib(m.temp)}",
            f"  donated      -{_gib(m.alias)} (outputs reusing donated inputs)",
            f"  total        {_gib(m.total)}" + (" (the train step)" if p.validation is not None else ""),
        ]
    if p.validation is not None and not m.from_compiler_error:
        v = p.validation
        lines += report_lines(v, _gib, p.peak_flops)
        lines.append(f"  with validation  {_gib(p.total)} (step arguments {_gib(m.argument)} + validation's "
                     f"{_gib(v.resident)} + the larger of the step's {_gib(m.total - m.argument)} and the "
                     f"sampler's {_gib(v.peak)})")  # fmt: skip
    if (ts := p.train_state) is not None:
        lines.append(f"  LoRA state   {ts.per_chip / 2**20:.1f} MiB (LoRA + optimizer state + EMA, in the arguments; "
                     f"{ts.replicated / 2**20:.1f} MiB if replicated)")  # fmt: skip
    lines.append(f"  capacity     {_gib(p.capacity)}")
    if p.remat_options:
        lines += ["", "remat auto (the first policy that fits is used)"]
        for o in p.remat_options:
            size = "no memory analysis" if o.total is None else _gib(o.total)
            verdict = "refused by the compiler" if o.refused else ("fits" if o.fits(p.capacity) else "does not fit")
            chosen = "  <- chosen" if o.policy == p.remat and not p.memory.from_compiler_error else ""
            lines.append(f"  {o.policy:<13}{size} ({verdict}){chosen}")
    if p.flops is not None:
        lines += ["", "compute per chip and step"]
        lines.append(f"  matmul FLOPs         {p.flops / 1e12:.4g} TFLOP (every loop iteration counted)")
        if p.xla_flops is not None:
            lines.append(f"  XLA cost analysis    {p.xla_flops / 1e12:.4g} TFLOP (loop bodies counted once)")
        if p.xla_optimal_seconds is not None:
            lines.append(f"  XLA optimal_seconds  {p.xla_optimal_seconds:.3f} s (loop bodies counted once)")
        if p.seconds_at_peak is not None:
            peak = p.peak_flops / 1e12
            lines.append(f"  s/step at peak       {p.seconds_at_peak:.3g} s (the matmul FLOPs at {peak:.0f} TFLOP/s "
                         "per chip: a floor)")  # fmt: skip
    lines += _estimate_lines(p)
    for note in p.notes:
        lines.append(f"note: {note}")
    lines.append("")
    verdict = "fits" if p.fits else "does not fit"
    lines.append(f"{verdict}: {_gib(p.total)} of {_gib(p.capacity)} per chip on {t.name}")
    return "\n".join(lines)
