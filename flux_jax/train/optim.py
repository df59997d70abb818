"""Optimizer and learning-rate schedule from ``OptimConfig``.

Gradient accumulation: :func:`build_optimizer` can wrap the optimizer in ``optax.MultiSteps`` (pass
``grad_accum``), which keeps a float32 accumulator of the trainable tree (small for LoRA) and applies
one real update every ``grad_accum`` calls. A trainer that instead accumulates micro-batches inside
one jitted step (``lax.scan``; one call per update, no extra state) should pass ``grad_accum=1``.
Either way ``total_steps`` and the schedule count optimizer *updates*: MultiSteps advances the inner
schedule only when it applies an update.

EMA of the weights (``ema_decay``) is the trainer's job: optax's EMA transforms act on updates, not
on parameters.
"""

from __future__ import annotations

import optax

from flux_jax.errors import ConfigError
from flux_jax.run_config import OptimConfig


def build_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``cfg.lr`` over ``warmup_steps``, then constant / cosine / linear decay.

    Decay runs over the remaining ``total_steps - warmup_steps`` updates and ends at
    ``lr * final_lr_ratio``. Like optax (and HF's schedulers), the rate at update 0 of a warmup is 0.
    """
    if total_steps < 1:
        raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
    warmup = cfg.warmup_steps
    if warmup > total_steps or (cfg.schedule != "constant" and warmup >= total_steps):
        raise ConfigError(
            f"optim.warmup_steps {warmup} leaves no steps for the {cfg.schedule!r} schedule (total {total_steps})",
            key="optim.warmup_steps",
        )
    decay_steps = total_steps - warmup
    end = cfg.lr * cfg.final_lr_ratio
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.final_lr_ratio)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:  # unreachable through load_config, which validates the Literal
        raise ConfigError(f"unknown schedule {cfg.schedule!r}", key="optim.schedule")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def build_optimizer(cfg: OptimConfig, total_steps: int, *, grad_accum: int = 1) -> optax.GradientTransformation:
    """Global-norm clipping (if ``clip_norm``), then AdamW / Adafactor / Lion on the schedule.

    Adafactor runs without parameter-scale multiplication (kohya's recommended ``scale_parameter=False``):
    with it, LoRA's zero-initialised B matrix would get near-zero steps, and ``lr`` would not mean what
    it means for AdamW. Adafactor uses its own epsilon (1e-30), not ``cfg.eps``.
    """
    if grad_accum < 1:
        raise ConfigError(f"grad_accum must be >= 1, got {grad_accum}", key="train.grad_accum")
    schedule = build_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "adafactor":
        opt = optax.adafactor(
            schedule,
            multiply_by_parameter_scale=False,
            weight_decay_rate=cfg.weight_decay or None,
        )
    elif cfg.name == "lion":
        opt = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    else:  # unreachable through load_config, which validates the Literal
        raise ConfigError(f"unknown optimizer {cfg.name!r}", key="optim.name")
    tx = opt if cfg.clip_norm is None else optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    if grad_accum > 1:
        # Clipping sits inside MultiSteps, so it clips the accumulated mean gradient, as torch does.
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum).gradient_transformation()
    return tx
