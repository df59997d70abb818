"""The trainer's input, whatever ``data`` points at: one iterator interface (``examples.DataIterator``) over

- ``data.synthetic``: the built-in synthetic set (shaped by the model: needs its config);
- a directory holding a cached-example ``index.json`` (``flux_jax.data.examples``);
- anything else: the latent cache of ``flux-jax cache`` (``flux_jax.data.pipeline``: grain, buckets, repeats,
  caption dropout), found from ``data.path`` / ``data.cache_dir``;
- ``data.datasets`` or a held-out split (``data.holdout``): one such cache per dataset, mixed by weight and
  without the held-out examples (``flux_jax.data.mixing``).

Opening validates the dataset, so a bad path fails before the (possibly 12B-parameter) base is built. Before
opening, `prepare_train_data` builds the latent cache when images have none complete yet (`flux-jax train`
caches first, exactly as `flux-jax cache` would).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import jax

from flux_jax.data.cache import CacheSummary, build_missing_cache
from flux_jax.data.examples import (
    INDEX_NAME,
    BatchIterator,
    CachedExamples,
    DataIterator,
    ExampleSource,
    synthetic_examples,
)
from flux_jax.data.mixing import dataset_views, make_mixed_iterator, uses_mixing
from flux_jax.data.pipeline import make_train_iterator
from flux_jax.errors import ConfigError, DataError
from flux_jax.model.config import FluxConfig
from flux_jax.run_config import RunConfig


def needs_model(cfg: RunConfig) -> bool:
    """Whether the input can only be opened once the model's dimensions are known (the synthetic set)."""
    return cfg.data.synthetic


def prepare_train_data(
    cfg: RunConfig, *, progress: bool = True, devices: Sequence[jax.Device] | None = None
) -> CacheSummary | None:
    """Build what `open_train_data` reads when it is missing: the latent cache of images whose cache is not
    complete (`cache.build_missing_cache`: a partial one is continued; a complete one is left to the checks of
    `open_train_data`), for each of ``data.datasets`` in turn. None when nothing was built: the synthetic set,
    cached examples, complete caches; else the summary of the last cache built."""
    if cfg.data.synthetic or (not cfg.data.datasets and (pathlib.Path(cfg.data.path) / INDEX_NAME).is_file()):
        return None
    built = None
    for view in dataset_views(cfg):
        built = build_missing_cache(view, progress=progress, devices=devices) or built
    return built


def open_train_data(cfg: RunConfig, model_cfg: FluxConfig | None = None) -> tuple[DataIterator, ExampleSource]:
    """The run's batch iterator (this host's rows of each global batch) and the examples behind it."""
    hosts, host = jax.process_count(), jax.process_index()
    if cfg.data.synthetic:
        if model_cfg is None:
            raise ValueError("the synthetic set is shaped by the model: pass its config")
        source: ExampleSource = synthetic_examples(
            in_channels=model_cfg.in_channels,
            context_dim=model_cfg.context_in_dim,
            vec_dim=model_cfg.vec_in_dim,
            resolution=cfg.data.resolution,
            seed=cfg.data.shuffle_seed,
        )
    elif not cfg.data.datasets and (pathlib.Path(cfg.data.path) / INDEX_NAME).is_file():
        if cfg.data.has_holdout:
            raise ConfigError(
                "data.holdout splits `flux-jax cache` latent caches; cached examples have no example keys to split "
                "by; set data.holdout=0 (and validation.loss_cache to held-out examples)",
                key="data.holdout",
            )
        source = CachedExamples(cfg.data.path)
    elif uses_mixing(cfg):
        return make_mixed_iterator(
            cfg, process_index=host, process_count=hosts, batch_size_per_host=cfg.train.batch_size // hosts
        )
    else:
        pipeline = make_train_iterator(
            cfg, process_index=host, process_count=hosts, batch_size_per_host=cfg.train.batch_size // hosts
        )
        return pipeline, pipeline.cache
    if cfg.encoders.online:
        raise ConfigError(
            "encoders.online encodes the captions of a `flux-jax cache` latent cache in the training step; the "
            "synthetic set and the cached-example format hold text states, not captions; set encoders.online=false",
            key="encoders.online",
        )
    if cfg.data.caption_dropout > 0:
        raise ConfigError(
            "data.caption_dropout > 0 needs the empty-caption embeddings of a `flux-jax cache` latent cache; the "
            "synthetic set and the cached-example format do not hold them; set data.caption_dropout=0",
            key="data.caption_dropout",
        )
    iterator = BatchIterator(
        source, batch_size=cfg.train.batch_size, seed=cfg.data.shuffle_seed, process_index=host, process_count=hosts
    )
    return iterator, source


def check_fits(source: ExampleSource, model_cfg: FluxConfig) -> None:
    """The examples' feature widths must be the model's (e.g. a cache made for another text encoder). A cache of
    token ids (``encoders.online``) has only its latents checked here; the trainer checks the text encoders'."""
    if getattr(source, "online", False):
        latents = source.read_many([0])[0]["latents"]
        want, got = {"latents": model_cfg.in_channels}, {"latents": latents.shape[-1]}
    else:
        first = source.read(0)
        want = {"latents": model_cfg.in_channels, "t5": model_cfg.context_in_dim, "clip": model_cfg.vec_in_dim}
        got = {"latents": first.latents.shape[-1], "t5": first.t5.shape[-1], "clip": first.clip.shape[-1]}
    bad = [f"{k} width {got[k]} (model expects {want[k]})" for k in want if got[k] != want[k]]
    if bad:
        raise DataError(f"{source.describe()}: examples do not fit the model: {', '.join(bad)}")
