"""Validation during training: pictures of the LoRA as it trains (on the training base or another one) and a
held-out loss, as a trainer hook (``Trainer.add_hook``).

``check_validation(cfg)`` reads and checks what the ``validation`` section names (the prompts, the other base's
path, the held-out cache) before anything is built; ``build_validation`` then builds, once: the prompts' T5 / CLIP
conditioning (the text encoders are freed right after), the VAE (kept), a ``FluxSampler`` and the held-out batches.

- On the training base the sampler is the trainer's model: its graphdef and frozen state, with the current LoRA
  values passed per call as ``extra``. On another base (``validation.base``, e.g. Flux.1-dev while training
  Dev2Pro) that checkpoint is loaded sharded on the same mesh (stored ``base_dtype``, fp8 by default) and put in
  place of the training base's weights under the same graphdef, so the same adapters (and their per-block masks)
  carry the same trained values. ``lora_scale`` multiplies the adapters' alpha in the sampling graphdef only.
- Each image has its own seed's noise, the [1, 16, H/8, W/8] draw a tool makes for that seed and this prompt alone
  (``validation.batch`` only groups images into sampler calls), so an image can be rendered again in diffusers or
  ComfyUI; prompts are encoded one by one for the same reason (ComfyUI pads T5 to the prompt's own length).
- When ``lora.init_from`` is a file with text-encoder parts (a whole LoRA from another trainer), the prompts are
  encoded with them merged into CLIP-L / T5 (at ``lora_scale`` too), on every validation of the run, resumed or
  not: the pictures show the user's LoRA whole. Those parts are not trained (see `flux_jax.train.lora_init`).
- The validation loss is ``eval_loss`` of the current LoRA on fixed held-out batches with fixed keys: the same
  noise and timesteps at every validation step, so its curve compares parameters, not draws.

Validation never changes training: it draws from no training RNG, reads nothing from the data iterator, and only
reads the train state (nothing it runs donates it). Each step writes ``<output_dir>/samples/<step>/`` (one PNG per
prompt and seed, ``grid.png``: prompts down, seeds across) and ``validation.json`` last (the completion marker
``done`` checks); images also go to TensorBoard and the loss and wall time to metrics.jsonl. Every process runs the
sampler (a computation over the whole mesh); only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from flux_jax import __version__, hub
from flux_jax.axes import Rules
from flux_jax.data.cache_reader import LatentCacheReader
from flux_jax.data.encoding import resolve_encoder_paths
from flux_jax.data.examples import INDEX_NAME, BatchIterator, CachedExamples, ExampleSource
from flux_jax.data.inputs import check_fits
from flux_jax.data.mixing import held_out_source
from flux_jax.errors import CheckpointError, ConfigError, DataError, FluxJaxError
from flux_jax.lora_io.combine import combine_text_encoder_loras
from flux_jax.lora_io.export import path_name
from flux_jax.lora_io.text_encoders import count
from flux_jax.model.config import FluxConfig
from flux_jax.model.lora import LoRADropoutKey, LoRAMask, lora_modules, set_lora_training
from flux_jax.run_config import RunConfig, ValidationConfig
from flux_jax.sampling.images import grid, write_png
from flux_jax.sampling.loading import load_transformer, load_vae_for
from flux_jax.sampling.prompts import PromptEncoder
from flux_jax.sampling.sampler import FluxSampler, SampleSettings, SamplingError, TextConditioning
from flux_jax.sharding import batch_sharding
from flux_jax.storage import run_path, write_text
from flux_jax.train.lora_init import text_encoder_parts
from flux_jax.train.metrics import MetricsWriter
from flux_jax.train.objective import Objective
from flux_jax.train.state import TrainState, unflatten
from flux_jax.train.step import STEP_KEYS, eval_loss
from flux_jax.weights.checkpoint import open_checkpoint

log = logging.getLogger(__name__)

SOFTWARE = f"flux-jax {__version__}"
SAMPLES_DIR = "samples"
MARKER = "validation.json"
GRID = "grid.png"


def image_name(prompt_index: int, seed: int) -> str:
    return f"{prompt_index}_seed{seed}.png"


def marker_path(run_dir: epath.Path, step: int) -> epath.Path:
    return run_dir / SAMPLES_DIR / str(step) / MARKER


def completed(run_dir: epath.Path, step: int) -> bool:
    """Whether validation of ``step`` finished in this run directory (its marker is there), agreed by every
    process (only process 0 may see the files of a run directory on its local disk)."""
    done = jax.process_index() == 0 and marker_path(run_dir, step).exists()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        done = bool(multihost_utils.broadcast_one_to_all(np.int32(done)))
    return bool(done)


# --------------------------------------------------------------------------------------------------
# Checking the section (before the model is built)


@dataclasses.dataclass(frozen=True)
class ValidationInputs:
    """What ``validation`` names, read and checked: the prompts, the other base's transformer, the held-out set."""

    prompts: tuple[str, ...]
    base: str
    """The transformer checkpoint to sample; "" = the training base."""
    base_config: FluxConfig | None
    """Its architecture (read from the checkpoint's header; the weights are loaded once the trainer is built)."""
    loss_source: ExampleSource | None


def read_prompts(v: ValidationConfig) -> tuple[str, ...]:
    if not v.prompts_file:
        return tuple(v.prompts)
    path = epath.Path(v.prompts_file)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        problem = f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
        raise ConfigError(f"validation.prompts_file: {path}: {problem}", key="validation.prompts_file") from None
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(
            f"validation.prompts_file: cannot read {path} ({reason})", key="validation.prompts_file"
        ) from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise ConfigError(f"validation.prompts_file: {path} holds no prompts", key="validation.prompts_file")
    return prompts


def open_base(base: str) -> tuple[str, FluxConfig]:
    """``validation.base`` as a transformer checkpoint (a FLUX.1 pipeline directory's transformer/, or itself) and
    its architecture; a missing or unreadable checkpoint is an error naming the key. Reads no weights. A Hugging
    Face Hub name is fetched first, its transformer only: the prompts are encoded with the ``encoders`` section's
    encoders, never with this base's."""
    try:
        path = Path(hub.resolve_transformer(base))
    except CheckpointError as e:
        raise CheckpointError(f"validation.base: {e}") from None
    if not path.exists():
        raise ConfigError(f"validation.base: {base} does not exist", key="validation.base")
    if (path / "transformer").is_dir():
        path = path / "transformer"
    try:
        with open_checkpoint(path) as ckpt:
            return str(path), ckpt.config
    except CheckpointError as e:
        raise CheckpointError(f"validation.base: {e}") from None


def open_loss_source(path: str) -> ExampleSource:
    """A held-out set: cached examples (index.json) or a `flux-jax cache` latent cache (cache.json)."""
    if not Path(path).is_dir():
        raise ConfigError(f"validation.loss_cache: {path} is not a directory", key="validation.loss_cache")
    try:
        if (Path(path) / INDEX_NAME).is_file():
            return CachedExamples(path)
        reader = LatentCacheReader(path)
    except DataError as e:
        raise DataError(f"validation.loss_cache: {e}") from None
    if reader.online:
        # The held-out loss runs eval_loss on text states; a cache of token ids would need the encoders there too.
        raise ConfigError(
            f"validation.loss_cache: {path} holds T5 / CLIP token ids (built with encoders.online: true); the "
            "held-out loss reads text states: build it with encoders.online: false (training may stay online)",
            key="validation.loss_cache",
        )
    return reader


def open_held_out_split(cfg: RunConfig) -> ExampleSource:
    """The held-out split of the training caches (``data.holdout``): read from the caches the training reads, so
    only once they are complete (after `inputs.prepare_train_data`)."""
    source = held_out_source(cfg)
    if source.online:
        raise ConfigError(
            "data.holdout: the validation loss reads the held-out examples' text states, and these caches hold T5 / "
            "CLIP token ids (encoders.online: true); set validation.loss_cache to a cache of states instead",
            key="data.holdout",
        )
    return source


def with_held_out_split(cfg: RunConfig, inputs: ValidationInputs | None) -> ValidationInputs | None:
    """``inputs`` with the held-out split as the validation loss's examples when ``data.holdout`` names one."""
    if inputs is None or not cfg.data.has_holdout:
        return inputs
    return dataclasses.replace(inputs, loss_source=open_held_out_split(cfg))


def check_validation(cfg: RunConfig) -> ValidationInputs | None:
    """The section's inputs, read and checked (cheap; before the base is built), or None when validation is off."""
    v = cfg.validation
    if not v.enabled:
        return None
    prompts = read_prompts(v)
    base, base_config = open_base(v.base) if v.base else ("", None)
    loss_source = open_loss_source(v.loss_cache) if v.loss_cache else None
    return ValidationInputs(prompts=prompts, base=base, base_config=base_config, loss_source=loss_source)


# --------------------------------------------------------------------------------------------------
# The sampling model


def _abstract(state: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def sampling_graphdef(graphdef: nnx.GraphDef, states: Sequence[nnx.State], *, lora_scale: float) -> nnx.GraphDef:
    """The trainer's graphdef for sampling: adapters in evaluation mode (no dropout) with alpha times ``lora_scale``.

    Built from shapes only (``states`` may be real or abstract); the trainer's own graphdef is not changed.
    """
    model = nnx.merge(graphdef, *(_abstract(s) for s in states))
    for _, linear in lora_modules(model):
        linear.lora.alpha = linear.lora.alpha * lora_scale
    set_lora_training(model, False)
    return nnx.split(model)[0]


def _leaf_shapes(state: nnx.State) -> dict[tuple, tuple[int, ...]]:
    return {path: tuple(var.get_value().shape) for path, var in nnx.to_flat_state(state)}


def check_same_architecture(path: str, config: FluxConfig, model_cfg: FluxConfig) -> None:
    """The LoRA fits ``validation.base`` only if it is the training base's architecture."""
    if config == model_cfg:
        return
    diffs = [
        f"{f.name} {getattr(config, f.name)!r} (training base: {getattr(model_cfg, f.name)!r})"
        for f in dataclasses.fields(model_cfg)
        if getattr(config, f.name) != getattr(model_cfg, f.name)
    ]
    raise ConfigError(
        f"validation.base: {path} is another architecture than the training base, so the LoRA does not fit it: "
        + ", ".join(diffs),
        key="validation.base",
    )


def other_base_params(
    path: str, *, frozen: nnx.State, cfg: RunConfig, mesh: Mesh, rules: Rules
) -> tuple[nnx.State, nnx.State]:
    """(the other base's weights, the adapters' frozen variables): the ``params`` of a sampler under the trainer's
    graphdef, which must be of the same architecture (``check_same_architecture``)."""
    v = cfg.validation
    log.info("validation: loading base %s as %s", path, v.base_dtype)
    model = load_transformer(
        path,
        dtype=v.base_dtype,
        compute_dtype=cfg.model.compute_dtype,
        mesh=mesh,
        rules=rules,
        attention=cfg.model.attention,
    )
    weights = nnx.state(model)
    del model
    adapter_vars, base_part = nnx.split_state(frozen, nnx.Any(LoRAMask, LoRADropoutKey), ...)
    if _leaf_shapes(weights) != _leaf_shapes(base_part):  # same config, so a bug rather than user input
        raise FluxJaxError(f"validation.base: {path} loaded into another parameter layout than the training base")
    return weights, adapter_vars


# --------------------------------------------------------------------------------------------------
# The held-out loss


class HeldOutLoss:
    """``eval_loss`` of a LoRA over fixed held-out batches with fixed keys (no update, no training RNG)."""

    def __init__(
        self,
        source: ExampleSource,
        *,
        rows: int,
        batches: int,
        seed: int,
        mesh: Mesh,
        graphdef: nnx.GraphDef,
        template: nnx.State,
        objective: Objective,
        label: str = "validation.loss_cache",
    ):
        try:
            iterator = BatchIterator(
                source,
                batch_size=rows,
                seed=seed,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
        except DataError as e:
            raise DataError(f"{label}: {e}") from None
        # This host's rows of each batch, read once: the same examples at every validation step.
        self.batches = [{k: v for k, v in next(iterator).items() if k in STEP_KEYS} for _ in range(batches)]
        base = jax.random.key(seed)
        self.keys = [jax.random.fold_in(base, j) for j in range(batches)]
        self.sharding = batch_sharding(mesh)
        self.fn = jax.jit(functools.partial(eval_loss, graphdef, template, objective=objective))

    def __call__(self, frozen: nnx.State, lora: dict[str, jax.Array]) -> float:
        losses = []
        for batch, key in zip(self.batches, self.keys, strict=True):
            placed = {k: jax.make_array_from_process_local_data(self.sharding, v) for k, v in batch.items()}
            losses.append(self.fn(frozen, lora, placed, key))
        return float(np.mean(jax.device_get(losses)))


# --------------------------------------------------------------------------------------------------
# The hook


@dataclasses.dataclass(frozen=True)
class _Call:
    """One sampler call: its (prompt index, seed) pairs (padded to the batch size by repeating the last one), the
    stacked prompt conditioning and the stacked per-seed noise."""

    pairs: tuple[tuple[int, int], ...]
    real: int
    """How many of ``pairs`` are wanted (the rest pad the batch)."""
    prompts: TextConditioning
    negative: TextConditioning | None
    """Each row's negative prompt (true CFG), at its prompt's T5 length."""
    noise: np.ndarray


def _stack(texts: Sequence[TextConditioning]) -> TextConditioning:
    return TextConditioning(t5=jnp.concatenate([t.t5 for t in texts]), clip=jnp.concatenate([t.clip for t in texts]))


def _calls(
    sampler: FluxSampler,
    texts: Sequence[TextConditioning],
    negatives: Sequence[TextConditioning] | None,
    seeds: Sequence[int],
    settings: SampleSettings,
    batch: int,
) -> list[_Call]:
    """Group every (prompt, seed) into calls of ``batch`` images whose prompts have the same T5 length."""
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for i, text in enumerate(texts):
        for seed in seeds:
            groups.setdefault(tuple(text.t5.shape[1:]), []).append((i, seed))
    noise = {seed: sampler.initial_noise(dataclasses.replace(settings, seed=seed), 1) for seed in seeds}
    calls = []
    for pairs in groups.values():
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            padded = tuple(chunk + [chunk[-1]] * (batch - len(chunk))) if len(pairs) > batch else tuple(chunk)
            calls.append(
                _Call(
                    pairs=padded,
                    real=len(chunk),
                    prompts=_stack([texts[i] for i, _ in padded]),
                    negative=None if negatives is None else _stack([negatives[i] for i, _ in padded]),
                    noise=np.concatenate([noise[seed] for _, seed in padded]),
                )
            )
    return calls


class Validation:
    """The trainer hook: ``validation(step, state)`` samples and measures; ``done(step)`` reads the marker."""

    def __init__(
        self,
        *,
        run_dir: epath.Path,
        config: ValidationConfig,
        metrics: MetricsWriter,
        template: nnx.State,
        frozen: nnx.State,
        prompts: Sequence[str] = (),
        sampler: FluxSampler | None = None,
        texts: Sequence[TextConditioning] = (),
        negatives: Sequence[TextConditioning] | None = None,
        settings: SampleSettings | None = None,
        base_name: str = "",
        loss: HeldOutLoss | None = None,
        text_encoder_lora: str = "",
    ):
        self.run_dir = run_dir
        self.config = config
        self.metrics = metrics
        self.template = template
        self.frozen = frozen
        self.prompts = tuple(prompts)
        self.sampler = sampler
        self.settings = settings
        self.base_name = base_name
        self.loss = loss
        self.text_encoder_lora = text_encoder_lora
        """The file (by name) whose text-encoder parts encoded the prompts; "" when none did."""
        self.calls = (
            _calls(sampler, texts, negatives, config.seeds, settings, config.batch)
            if sampler is not None and settings
            else []
        )
        self.writes = jax.process_index() == 0
        self.runs: list[int] = []
        """The steps this object validated (tests count them)."""

    def done(self, step: int) -> bool:
        return completed(self.run_dir, step)

    def describe(self) -> dict[str, Any]:
        """The settings every image and marker records."""
        v = self.config
        out: dict[str, Any] = {"base": self.base_name}
        if self.sampler is not None:
            out.update(
                width=v.width,
                height=v.height,
                steps=v.steps,
                guidance=v.guidance,
                cfg=v.cfg,
                negative=v.negative,
                lora_scale=v.lora_scale,
                match=v.match,
            )
            if self.text_encoder_lora:
                out["text_encoder_lora"] = self.text_encoder_lora
        if self.loss is not None:
            out.update(loss_cache=v.loss_cache, loss_batches=v.loss_batches, loss_seed=v.loss_seed)
        return out

    def __call__(self, step: int, state: TrainState) -> None:
        started = time.perf_counter()
        out = self.run_dir / SAMPLES_DIR / str(step)
        if self.writes:
            out.mkdir(parents=True, exist_ok=True)
            marker = out / MARKER
            if marker.exists():  # an earlier run validated this step but was killed before saving it: again
                marker.unlink()
        record: dict[str, Any] = {}
        names: list[str] = []
        if self.sampler is not None:
            names = self._sample(step, state, out)
        if self.loss is not None:
            record["val_loss"] = self.loss(self.frozen, state.lora)
        record["validation_time"] = time.perf_counter() - started
        self.metrics.write(step, record, group="validation")
        if self.writes:
            summary = {"step": step, "settings": self.describe(), "prompts": list(self.prompts), "images": names}
            write_text(out / MARKER, json.dumps({**summary, **record}, indent=1) + "\n")  # last: the marker
        self.runs.append(step)
        loss = f", val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
        log.info(
            "validation at step %d: %d images in %s%s (%.1f s)",
            step,
            len(names),
            out,
            loss,
            record["validation_time"],
        )

    def _sample(self, step: int, state: TrainState, out: epath.Path) -> list[str]:
        assert self.sampler is not None and self.settings is not None
        extra = unflatten(self.template, state.lora)
        images: dict[tuple[int, int], np.ndarray] = {}
        for call in self.calls:
            settings = dataclasses.replace(self.settings, seed=call.pairs[0][1])
            got = self.sampler.images(call.prompts, settings, negative=call.negative, noise=call.noise, extra=extra)
            for pair, image in zip(call.pairs[: call.real], got[: call.real], strict=True):
                images[pair] = np.asarray(image)
        seeds = self.config.seeds
        ordered = [(i, seed) for i in range(len(self.prompts)) for seed in seeds]
        names = [image_name(i, seed) for i, seed in ordered]
        if self.writes:
            settings = {k: str(v) for k, v in self.describe().items() if not k.startswith("loss_")}
            for (i, seed), name in zip(ordered, names, strict=True):
                text = {"prompt": self.prompts[i], "seed": str(seed), "step": str(step), **settings}
                write_png(out / name, images[(i, seed)], {**text, "Software": SOFTWARE})
            pictures = grid([images[p] for p in ordered], columns=len(seeds))
            write_png(out / GRID, pictures, {"step": str(step), **settings, "Software": SOFTWARE})
        self.metrics.add_images(
            step, {f"samples/{name.removesuffix('.png')}": images[p] for p, name in zip(ordered, names, strict=True)}
        )
        return names


def build_validation(
    cfg: RunConfig,
    inputs: ValidationInputs,
    *,
    mesh: Mesh,
    rules: Rules,
    graphdef: nnx.GraphDef,
    template: nnx.State,
    frozen: nnx.State,
    model_cfg: FluxConfig,
    objective: Objective,
    metrics: MetricsWriter,
) -> Validation:
    """The hook for ``cfg.validation`` (see the module docstring), built once: prompts encoded (then the text
    encoders freed), the VAE and the sampler placed on ``mesh``, the held-out batches read."""
    v = cfg.validation
    run_dir = run_path(cfg.output_dir)
    if inputs.base_config is not None:  # before anything is loaded for validation
        check_same_architecture(inputs.base, inputs.base_config, model_cfg)
    sampler, texts, negatives, settings = None, [], None, None
    # The base as configured (a Hub name stays one, not its path in the local HF cache).
    base_name = v.base or cfg.model.base or f"random:{cfg.model.preset}"
    text_lora_name = ""
    if inputs.prompts:
        settings = SampleSettings(
            width=v.width, height=v.height, steps=v.steps, guidance=v.guidance, cfg=v.cfg, match=v.match
        )
        try:
            settings.check()
        except SamplingError as e:
            raise ConfigError(f"validation: {e}", key="validation") from None
        with tempfile.TemporaryDirectory(prefix="flux_jax_demo_encoders_") as demo_dir:
            paths, _ = resolve_encoder_paths(cfg, Path(demo_dir))
            text_loras = combine_text_encoder_loras([(text_encoder_parts(cfg.lora.init_from, model_cfg), v.lora_scale)])
            if text_loras:
                text_lora_name = path_name(str(cfg.lora.init_from))
                log.info(
                    "validation: encoding the prompts with the text-encoder LoRA parts of lora.init_from %s (%s)",
                    cfg.lora.init_from,
                    count(text_loras),
                )
            encoder = PromptEncoder.load(paths, mesh=mesh, dtype=cfg.encoders.dtype, loras=text_loras)
            schnell = not model_cfg.guidance_embed
            # One prompt at a time, as a tool encodes a single prompt (ComfyUI pads T5 to the prompt's length),
            # with the negative prompt at the same length when true CFG needs it.
            negative = v.negative if v.cfg > 1.0 else None
            pairs = [
                encoder.encode_with_negative([p], negative, match=v.match, schnell=schnell) for p in inputs.prompts
            ]
            texts = [text for text, _ in pairs]
            negatives = [neg for _, neg in pairs] if negative is not None else None
            widths = (int(texts[0].t5.shape[-1]), int(texts[0].clip.shape[-1]))
            if widths != (model_cfg.context_in_dim, model_cfg.vec_in_dim):
                raise ConfigError(
                    f"validation: the text encoders ({paths.t5}, {paths.clip}) give T5 / CLIP widths {widths}, the "
                    f"model takes {(model_cfg.context_in_dim, model_cfg.vec_in_dim)}; set encoders.root to the "
                    "base's FLUX.1 download (the encoders `flux-jax cache` uses)",
                    key="encoders",
                )
            del encoder  # T5-XXL is ~9 GB in bf16: gone before the other base and the VAE arrive
            gc.collect()
            vae = load_vae_for(paths, dtype=cfg.encoders.dtype, mesh=mesh)
        if inputs.base:
            weights, adapter_vars = other_base_params(inputs.base, frozen=frozen, cfg=cfg, mesh=mesh, rules=rules)
            params: tuple[nnx.State, ...] = (weights, adapter_vars)
        else:
            params = (frozen,)
        sampling_def = sampling_graphdef(graphdef, (template, *params), lora_scale=v.lora_scale)
        # config and dtype given: ``params`` lack the LoRA values, which come with each call as ``extra``.
        sampler = FluxSampler(
            sampling_def, params, vae, config=model_cfg, mesh=mesh, rules=rules, dtype=cfg.model.compute_dtype
        )
    loss = None
    if inputs.loss_source is not None:
        check_fits(inputs.loss_source, model_cfg)
        loss = HeldOutLoss(
            inputs.loss_source,
            rows=cfg.train.batch_size // cfg.train.grad_accum,
            batches=v.loss_batches,
            seed=v.loss_seed,
            mesh=mesh,
            graphdef=graphdef,
            template=template,
            objective=objective,
            label="validation.loss_cache" if v.loss_cache else "data.holdout",
        )
    return Validation(
        run_dir=run_dir,
        config=v,
        metrics=metrics,
        template=template,
        frozen=frozen,
        prompts=inputs.prompts,
        sampler=sampler,
        texts=texts,
        negatives=negatives,
        settings=settings,
        base_name=base_name,
        loss=loss,
        text_encoder_lora=text_lora_name,
    )
