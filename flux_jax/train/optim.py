"""Optimizer and learning-rate schedule from ``OptimConfig``.

Gradient accumulation: :func:`build_optimizer` can wrap the optimizer in ``optax.MultiSteps`` (pass
``grad_accum``), which keeps a float32 accumulator of the trainable tree (small for LoRA) and applies
one real update every ``grad_accum`` calls. A trainer that instead accumulates micro-batches inside
one jitted step (``lax.scan``; one call per update, no extra state) should pass ``grad_accum=1``.
Either way ``total_steps`` and the schedule count optimizer *updates*: MultiSteps advances the inner
schedule only when it applies an update.

EMA of the weights (``ema_decay``) is the trainer's job: optax's EMA transforms act on updates, not
on parameters.

bf16 masters (``master_dtype: bf16``): the optimizer is wrapped so its state (moments, MultiSteps' accumulator) is
fp32 and its updates come out fp32; ``flux_jax.train.rounding.apply_updates`` then rounds ``p + u`` to bf16
stochastically. :func:`opt_state_shardings` gives the state the params' shardings, Adafactor's factored statistics
included.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
    if cfg.master_dtype == "bf16":
        tx = fp32_state(tx)
    return tx


def _up(tree: Any) -> Any:
    # Leaves without a dtype (optax.tree_map_params' placeholder has no leaves at all) pass through.
    def cast(x: Any) -> Any:
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize < 4:
            return x.astype(jnp.float32)
        return x

    return jax.tree.map(cast, tree)


def fp32_state(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` run on fp32 copies of low-precision params and gradients: its state and its updates are fp32.

    optax sizes most state like the params (Adam's ``nu``, Lion's momentum, Adafactor's statistics, MultiSteps'
    accumulator), so bf16 params would otherwise get bf16 moments, whose squared-gradient averages lose most of
    their precision. The fp32 updates are what stochastic rounding needs to see.
    """

    def init(params: Any) -> Any:
        return inner.init(_up(params))

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        return inner.update(_up(updates), state, None if params is None else _up(params))

    return optax.GradientTransformation(init, update)


def state_leaf_sharding(shape: tuple[int, ...], param: Any, mesh: Mesh) -> NamedSharding:
    """The sharding of one optimizer-state leaf of ``shape`` that belongs to ``param`` (which carries a sharding).

    Same shape as the param: the param's sharding. One dim fewer (Adafactor's factored row / column statistics,
    the param with one dim averaged out): the param's spec with that dim's entry dropped; where several dims could
    be the dropped one (equal sizes), the choice keeping the most mesh axes (any is valid, the sizes match).
    Anything else (scalars, Adafactor's ``(1,)`` placeholders) is replicated.
    """
    repl = NamedSharding(mesh, PartitionSpec())
    sharding = getattr(param, "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh != mesh:
        return repl
    pshape = tuple(param.shape)
    shape = tuple(shape)
    if shape == pshape:
        return sharding
    if len(shape) != len(pshape) - 1:
        return repl
    spec = tuple(sharding.spec) + (None,) * (len(pshape) - len(sharding.spec))

    def kept(d: int) -> tuple[Any, ...]:
        return spec[:d] + spec[d + 1 :]

    def n_axes(entries: tuple[Any, ...]) -> int:
        return sum(0 if e is None else 1 if isinstance(e, str) else len(e) for e in entries)

    dims = [d for d in range(len(pshape)) if pshape[:d] + pshape[d + 1 :] == shape]
    if not dims:
        return repl
    best = max(dims, key=lambda d: n_axes(kept(d)))
    return NamedSharding(mesh, PartitionSpec(*kept(best)))


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, mesh: Mesh) -> Any:
    """NamedShardings for ``tx``'s state, from ``params`` (arrays or ShapeDtypeStructs that carry shardings).

    Params-shaped trees in the state (found with ``optax.tree_map_params``) follow their params, leaf by leaf,
    through :func:`state_leaf_sharding`; everything else is replicated.
    """
    repl = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(
        tx,
        lambda leaf, param: state_leaf_sharding(leaf.shape, param, mesh),
        abstract,
        params,
        transform_non_params=lambda _: repl,
    )
