"""Typed run configuration: frozen per-concern dataclasses loaded from YAML plus ``a.b=c`` overrides.

A YAML file sets any subset of the sections below; everything it omits takes the dataclass default,
so small files (``configs/mesh/*.yaml`` holding only ``mesh:`` and ``train.batch_size``) parse too.
Unknown keys at any depth, wrong types and out-of-range values are errors that name the full dotted
key and the file or override they came from. Values that only matter once training starts (a base
checkpoint, a data path) are checked by :meth:`RunConfig.validate_for_training`, not at load time.

Parsing a config has no side effects: it never initialises jax.distributed or touches devices.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from flux_jax import typed_config
from flux_jax.axes import DEFAULT_RULES, MESH_AXES, ShardingError, validate_rules
from flux_jax.errors import ConfigError
from flux_jax.model.config import PRESETS
from flux_jax.storage import is_remote


def _require(ok: bool, field: str, message: str) -> None:
    """Raise for an invalid field value; the loader prefixes the section, e.g. ``train.steps``."""
    if not ok:
        raise ConfigError(f"{field}: {message}", key=field)


# --------------------------------------------------------------------------------------------------
# Sections. A string literal after a field documents it (Levanter's convention).


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    base: str = ""
    """Base checkpoint: a diffusers transformer dir, a BFL/ComfyUI single file (bf16 or fp8), a Flax checkpoint, or
    a Hugging Face Hub name of one (``ashen0209/Flux-Dev2Pro``, ``org/name@revision``, ``org/name/file.safetensors``;
    a pipeline repository gives its transformer/), fetched into the HF cache (`flux_jax.hub`)."""
    preset: str | None = None
    """Architecture preset (``flux_jax.model.config.PRESETS``); with ``base: ""`` a random base of this shape
    is built, which is how tests and the tiny smoke run train without a checkpoint."""
    base_dtype: Literal["fp32", "bf16", "fp8"] = "bf16"
    """Storage dtype of the frozen base weights."""
    compute_dtype: Literal["fp32", "bf16"] = "bf16"
    attention: Literal["auto", "xla", "cudnn", "splash"] = "auto"
    """Attention kernel: ``auto`` runs splash (Pallas) on TPU, cuDNN flash on NVIDIA GPUs, XLA elsewhere, and XLA
    where that kernel cannot run the model's head_dim / compute dtype (logged); an explicit kernel that cannot run
    is an error (``flux_jax.model.attention.resolve_attention``)."""
    remat: Literal["auto", "none", "full", "save_matmuls"] = "auto"
    """Per-block rematerialisation policy; ``auto``: the first of none, save_matmuls, full whose compiled step fits
    the device (``flux_jax.train.memory``)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    """Scale is alpha / rank (kohya/PEFT semantics)."""
    targets: str | tuple[str, ...] = "all_blocks"
    """A target preset name, or regexes over parameter paths."""
    blocks: tuple[int, ...] | None = None
    """Restrict adapters to these block indices; None = every block."""
    dropout: float = 0.0
    init_from: str | None = None
    """Start from an existing LoRA instead of (random A, zero B): a LoRA file in any supported format, or a training
    run directory (its latest checkpoint). Its rank must equal ``rank``; ignored when the run resumes."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the trainable adapter weights (fp32 keeps small updates from rounding away)."""
    trigger_words: tuple[str, ...] = ()
    """Words that call up what the LoRA learned (the captions' trigger token, e.g. ``ohwx``); they go into the
    exported file's metadata and model card (``instance_prompt``). Training does not use them."""

    def __post_init__(self) -> None:
        for i, word in enumerate(self.trigger_words):
            _require(bool(word.strip()), f"trigger_words[{i}]", "is empty")
        _require(self.rank >= 1, "rank", f"must be >= 1, got {self.rank}")
        _require(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        if self.blocks is not None:
            _require(all(b >= 0 for b in self.blocks), "blocks", f"indices must be >= 0, got {self.blocks}")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """One of several datasets trained together (``data.datasets``). Unset (null) fields take the ``data`` section's
    value; the settings that shape the cache (resolution, buckets, crops, flips, seed, bad-data policy) are the
    ``data`` section's for every dataset, so all caches hold batches the same step takes."""

    path: str = ""
    """As ``data.path``."""
    source: Literal["folder", "tfds", "webdataset", "parquet"] | None = None
    split: str | None = None
    tfds_data_dir: str | None = None
    image_key: str | None = None
    caption_key: str | None = None
    caption_ext: str | None = None
    cache_dir: str | None = None
    """This dataset's latent cache; null = ``<data.cache_dir>/<index>`` when ``data.cache_dir`` is set, else next to
    the data as for a single dataset. Two datasets may not share a cache."""
    weight: float | None = None
    """Share of the training batches (so of examples) drawn from this dataset, normalised over the datasets; a batch
    is one dataset's. Null on every dataset = its batches per pass over it (records x repeats, per bucket), so all
    datasets finish their passes together: the datasets concatenated. Set on all or none."""
    repeats: int = 1
    """Multiplies the dataset's own repeats (kohya ``N_name/`` folders): each of its examples appears this many times
    more per pass over the dataset (and, without weights, the dataset this much more often)."""

    def __post_init__(self) -> None:
        _require(bool(self.path), "path", "is empty")
        if self.weight is not None:
            _require(self.weight > 0, "weight", f"must be > 0 or null, got {self.weight}")
        _require(self.repeats >= 1, "repeats", f"must be >= 1, got {self.repeats}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = ""
    """Dataset location; required at train time unless the trainer synthesises data."""
    cache_dir: str | None = None
    """Where latent / text-embedding caches live; None = next to the data. A ``gs://`` URL keeps the cache in a
    bucket, built and read through a local copy on each host (``cache_local_dir``)."""
    cache_local_dir: str | None = None
    """For a ``gs://`` ``cache_dir``: this host's local copy of it (local disk the size of the cache; on a pod each
    host's own disk, not a shared filesystem); None = ``~/.cache/flux_jax/caches/gs/<bucket>/<path>``."""
    resolution: int = 512
    shuffle_seed: int = 0
    caption_dropout: float = 0.0
    """Probability of training a sample with the empty caption."""
    synthetic: bool = False
    """Train on a small built-in synthetic dataset shaped for the model (smoke runs; needs ``path: ""``)."""
    # ---- Sources, bucketing, augmentation and bad-data policy (flux_jax.data; `flux-jax cache`).
    source: Literal["folder", "tfds", "webdataset", "parquet"] = "folder"
    """``folder``: images with same-named caption files (kohya ``N_name/`` subfolders repeat N times) or a
    ``metadata.jsonl``/``.csv``; ``tfds``: ``path`` is a TFDS dataset name or a prepared dataset directory;
    ``webdataset``: tar shards as img2dataset writes them (``KEY.jpg`` + ``KEY.txt`` or ``KEY.json``);
    ``parquet``: files in the Hugging Face datasets layout. For these two ``path`` is a directory of ``.tar`` /
    ``.parquet`` files, a glob or a brace range (``shards/{00000..00099}.tar``), local or ``gs://``."""
    split: str = "train"
    """TFDS split to read."""
    tfds_data_dir: str | None = None
    """TFDS data_dir for a dataset given by name; None = TFDS's default."""
    image_key: str = "image"
    """TFDS feature, or parquet column, holding the image (encoded bytes, a uint8 array, or a datasets ``Image``
    struct of ``bytes`` and ``path``)."""
    caption_key: str = "text"
    """TFDS feature, metadata.jsonl/csv or parquet column, or field of a webdataset sample's ``.json``, holding the
    caption."""
    caption_ext: str = ".txt"
    """Caption files beside images (folder), or the caption member of a webdataset sample (it wins over ``.json``)."""
    resolutions: tuple[int, ...] = ()
    """Several target sides (bucket area = side^2), each image cached at every one it reaches without
    upscaling past ``max_upscale``; empty = just ``resolution``."""
    bucket_step: int = 64
    """Bucket sides are multiples of this many pixels."""
    max_aspect: float = 4.0
    """Widest bucket aspect ratio (long side / short side)."""
    max_upscale: float = 1.0
    """Largest resize factor allowed to fill a bucket; 1.0 never upscales."""
    crop: Literal["center", "random"] = "center"
    crop_variants: int = 1
    """Random crops cached per image and resolution (crop: random); each appearance picks one."""
    flip: bool = False
    """Also cache the mirrored image; each appearance picks one of the two."""
    missing_caption: Literal["skip", "empty"] = "skip"
    """Images whose caption is missing or empty: skipped, or trained with the empty caption (reported either way)."""
    max_image_pixels: int = 100_000_000
    """Images with more pixels are refused as decompression bombs before any pixel is decoded."""
    strict: bool = False
    """Any bad or converted input is an error instead of a skip or conversion (``flux-jax cache --strict``)."""
    read_threads: int = 4
    """Threads reading and collating cached batches (grain)."""
    # ---- Several datasets and a held-out split (flux_jax.data.mixing).
    datasets: tuple[DatasetConfig, ...] = ()
    """Several datasets trained together, each with its own latent cache, drawn from by ``weight`` (grain's
    ``MapDataset.mix``); instead of ``path`` (empty = the one dataset ``path`` names)."""
    holdout: float = 0.0
    """Fraction of each dataset's examples kept out of training for the validation loss, chosen by a hash of the
    example's key (its file or shard name), so an example stays on its side when others are added or removed."""
    holdout_count: int = 0
    """Instead of ``holdout``: this many examples of each dataset (those of the smallest key hashes)."""

    def __post_init__(self) -> None:
        _require(
            self.resolution >= 16 and self.resolution % 16 == 0,
            "resolution",
            f"must be a positive multiple of 16 (VAE /8 then 2x2 packing), got {self.resolution}",
        )
        _require(not (self.synthetic and self.path), "synthetic", f"set either path ({self.path!r}) or synthetic")
        _require(
            0.0 <= self.caption_dropout <= 1.0,
            "caption_dropout",
            f"must be in [0, 1], got {self.caption_dropout}",
        )
        _require(
            self.bucket_step >= 16 and self.bucket_step % 16 == 0,
            "bucket_step",
            f"must be a positive multiple of 16, got {self.bucket_step}",
        )
        for side in self.resolutions:
            _require(side >= self.bucket_step, "resolutions", f"every side must be >= bucket_step, got {side}")
        _require(self.max_aspect >= 1.0, "max_aspect", f"must be >= 1, got {self.max_aspect}")
        _require(self.max_upscale >= 1.0, "max_upscale", f"must be >= 1, got {self.max_upscale}")
        _require(self.crop_variants >= 1, "crop_variants", f"must be >= 1, got {self.crop_variants}")
        _require(
            self.crop == "random" or self.crop_variants == 1,
            "crop_variants",
            "more than one crop variant needs crop: random",
        )
        _require(self.max_image_pixels >= 1, "max_image_pixels", f"must be >= 1, got {self.max_image_pixels}")
        _require(self.read_threads >= 1, "read_threads", f"must be >= 1, got {self.read_threads}")
        if self.datasets:
            _require(not self.path, "datasets", f"set either path ({self.path!r}) or datasets, not both")
            _require(not self.synthetic, "datasets", "set either synthetic or datasets")
            weighted = [d.weight is not None for d in self.datasets]
            _require(all(weighted) or not any(weighted), "datasets", "set weight on every dataset or on none")
        _require(0.0 <= self.holdout < 1.0, "holdout", f"must be in [0, 1), got {self.holdout}")
        _require(self.holdout_count >= 0, "holdout_count", f"must be >= 0, got {self.holdout_count}")
        _require(
            not (self.holdout and self.holdout_count),
            "holdout_count",
            f"set either holdout ({self.holdout}) or holdout_count, not both",
        )
        _require(not (self.synthetic and self.has_holdout), "holdout", "the synthetic set has no held-out split")

        if self.cache_local_dir is not None:
            _require(
                is_remote(self.cache_dir or "") and not is_remote(self.cache_local_dir),
                "cache_local_dir",
                f"is the local copy of a gs:// cache_dir: a local path, with cache_dir a bucket URL (cache_dir is "
                f"{self.cache_dir!r}, cache_local_dir {self.cache_local_dir!r})",
            )

    @property
    def has_holdout(self) -> bool:
        return bool(self.holdout or self.holdout_count)


@dataclasses.dataclass(frozen=True)
class EncodersConfig:
    """The frozen VAE / T5 / CLIP used by ``flux-jax cache``. Empty paths are filled from ``root`` (a FLUX.1
    diffusers download: vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/); with everything
    empty, tiny random-weight demo encoders are generated (deterministically, from ``demo_seed``)."""

    root: str = ""
    """A FLUX.1 diffusers download, or its Hugging Face Hub name (``black-forest-labs/FLUX.1-dev``: only the
    encoders' folders are fetched)."""
    vae: str = ""
    """A diffusers ``vae/`` directory or a BFL ``ae.safetensors`` file (each encoder path may be a Hub name too:
    ``org/name/vae`` fetches that folder, ``org/name`` a pipeline repository's own folder for it)."""
    t5: str = ""
    """A transformers ``T5EncoderModel`` directory (config.json + safetensors)."""
    clip: str = ""
    """A transformers ``CLIPTextModel`` directory (config.json + safetensors)."""
    t5_tokenizer: str = ""
    clip_tokenizer: str = ""
    t5_max_length: int = 512
    """T5 tokens per caption (FLUX.1-dev: 512); the cached ``t5`` states have this length."""
    dtype: Literal["fp32", "bf16"] = "bf16"
    """Encoder weights and activations; the cache stores bf16 either way."""
    batch_size: int = 8
    """Global encode batch; rounded up to a multiple of the mesh's batch devices."""
    demo_seed: int = 0
    online: bool = False
    """Encode the captions inside the training step instead of once into the cache: the cache then holds latents
    and T5 / CLIP token ids only, and T5 / CLIP run frozen (weights sharded on the mesh, no gradients) in every
    step, their states rounded to the dtypes the cache would store them in (T5 bf16, CLIP fp32) so both ways train
    the same LoRA. A cache of one kind is refused by a run of the other."""

    def __post_init__(self) -> None:
        _require(self.t5_max_length >= 1, "t5_max_length", f"must be >= 1, got {self.t5_max_length}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    mode: Literal["lora", "full"] = "lora"
    """``lora``: train adapters on a frozen base. ``full``: train the base's own parameters (those ``trainable``
    selects), no adapters; the base must then be fp32 masters (``model.base_dtype: fp32``)."""
    trainable: tuple[str, ...] = ()
    """Full mode: regexes (``re.search``) over dotted parameter paths, e.g. ``double_blocks\\.`` (a parameter
    trains if any matches); empty = every parameter. Lora mode: must be empty (``lora.targets`` selects)."""
    steps: int = 1000
    """Optimizer updates (not micro-batches)."""
    seed: int = 0
    batch_size: int = 1
    """Global batch per optimizer update, over all devices and accumulation micro-batches."""
    grad_accum: int = 1
    """Micro-batches per update; batch_size must divide evenly."""
    guidance: float = 1.0
    """Guidance value fed to guidance_in; 1.0 is the Dev2Pro recipe."""
    guidance_range: tuple[float, float] | None = None
    """If set, sample guidance uniformly in [low, high] per sample instead."""
    timestep_sampling: Literal["uniform", "logit_normal", "shift", "flux_shift", "mode"] = "flux_shift"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0
    """Static shift S for ``timestep_sampling: shift`` (kohya recommends 3.1582)."""
    mode_scale: float = 1.29
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        _require(
            self.batch_size % self.grad_accum == 0,
            "batch_size",
            f"{self.batch_size} is not divisible by grad_accum {self.grad_accum}",
        )
        for i, pattern in enumerate(self.trainable):
            try:
                re.compile(pattern)
            except re.error as e:
                _require(False, f"trainable[{i}]", f"{pattern!r} is not a regular expression ({e})")
        _require(
            self.mode == "full" or not self.trainable,
            "trainable",
            "selects base parameters for train.mode: full; in lora mode lora.targets selects what trains",
        )
        _require(self.logit_std > 0, "logit_std", f"must be > 0, got {self.logit_std}")
        _require(self.shift > 0, "shift", f"must be > 0, got {self.shift}")
        if self.guidance_range is not None:
            low, high = self.guidance_range
            _require(low <= high, "guidance_range", f"low must be <= high, got {self.guidance_range}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "adafactor", "lion"] = "adamw"
    lr: float = 1e-4
    """Peak learning rate, reached after warmup."""
    weight_decay: float = 0.01
    """Decoupled weight decay (scaled by the learning rate, as in AdamW)."""
    b1: float = 0.9
    b2: float = 0.999
    """Lion's paper default is 0.99; set it explicitly for lion."""
    eps: float = 1e-8
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    final_lr_ratio: float = 0.0
    """For cosine/linear: the learning rate at the last step, as a fraction of lr."""
    clip_norm: float | None = 1.0
    """Global-norm gradient clipping; None disables it."""
    ema_decay: float | None = None
    """EMA of the trainable weights, kept by the trainer; None disables it."""
    master_dtype: Literal["fp32", "bf16"] = "fp32"
    """How updates reach the trainable weights. fp32: added in the weights' own dtype, rounded to nearest. bf16: the
    weights are stored bf16 and each update is summed in fp32 and rounded to bf16 stochastically (unbiased, so
    updates below half a bf16 ulp still move the weights on average); the optimizer moments stay fp32."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(0.0 <= self.b1 < 1.0, "b1", f"must be in [0, 1), got {self.b1}")
        _require(0.0 <= self.b2 < 1.0, "b2", f"must be in [0, 1), got {self.b2}")
        _require(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(
            0.0 <= self.final_lr_ratio <= 1.0,
            "final_lr_ratio",
            f"must be in [0, 1], got {self.final_lr_ratio}",
        )
        if self.clip_norm is not None:
            _require(self.clip_norm > 0, "clip_norm", f"must be > 0 or null, got {self.clip_norm}")
        if self.ema_decay is not None:
            _require(0.0 < self.ema_decay < 1.0, "ema_decay", f"must be in (0, 1) or null, got {self.ema_decay}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    """Pure data-parallel replicas; -1 = fill with the remaining devices (at most one axis may be -1)."""
    fsdp: int = 1
    """Devices the base weights are sharded over (and the batch too)."""
    tensor: int = 1
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = DEFAULT_RULES
    """Logical axis -> mesh axis table; replaces the default table as a whole when set (a table without
    ``lora_feature`` leaves the LoRA adapters whole on the side of their kernel's unsplit axis)."""

    def __post_init__(self) -> None:
        for name in MESH_AXES:
            size = getattr(self, name)
            _require(size == -1 or size >= 1, name, f"must be a positive int or -1, got {size}")
        auto = [name for name in MESH_AXES if getattr(self, name) == -1]
        _require(len(auto) <= 1, auto[-1] if auto else "data", f"at most one mesh axis may be -1, got {auto}")
        try:
            validate_rules(self.rules)
        except ShardingError as e:
            raise ConfigError(f"rules: {e}", key="rules") from None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(data, fsdp, tensor) as written, -1 included; ``sharding.make_mesh`` resolves it."""
        return self.data, self.fsdp, self.tensor


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100
    """Save every N optimizer steps (and at the last step)."""
    keep: int = 3
    async_save: bool = True

    def __post_init__(self) -> None:
        _require(self.every >= 1, "every", f"must be >= 1, got {self.every}")
        _require(self.keep >= 1, "keep", f"must be >= 1, got {self.keep}")


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases, beside TensorBoard: on when ``project`` is set (``pip install 'flux-jax[wandb]'``)."""

    project: str = ""
    entity: str = ""
    """W&B user or team; empty = your default entity."""
    name: str = ""
    """Display name of the run; empty = W&B's generated one."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """``offline`` writes the run under ``<run>/wandb/`` for a later ``wandb sync``."""


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every: int = 1
    tensorboard: bool = True
    wandb: WandbConfig = WandbConfig()
    """Off unless ``log.wandb.project`` is set; the run resumes into the same W&B run (id in ``<run>/wandb_id``)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for the MFU metric; None = known accelerators' bf16 peak (no MFU on CPU)."""

    def __post_init__(self) -> None:
        _require(self.every >= 1, "every", f"must be >= 1, got {self.every}")
        if self.peak_tflops is not None:
            _require(self.peak_tflops > 0, "peak_tflops", f"must be > 0 or null, got {self.peak_tflops}")


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """Pictures and a held-out loss while training (``flux_jax.train.validation``); off unless ``every`` is set.

    Images go to ``<output_dir>/samples/<step>/`` (one PNG per prompt and seed, a grid, and ``validation.json``
    written last) and to TensorBoard; the loss to metrics.jsonl. Validation reads nothing the training reads (its
    own noise, its own data) and never changes the LoRA."""

    every: int | None = None
    """Validate every N optimizer steps, at step 0 (the "before" picture) and at the last step; 0 or null = off."""
    prompts: tuple[str, ...] = ()
    prompts_file: str = ""
    """A text file of prompts, one per line (blank lines skipped); instead of ``prompts``."""
    negative: str = ""
    """The negative prompt of true CFG (``cfg`` > 1); empty = the empty prompt, as diffusers' ``negative_prompt=""``."""
    seeds: tuple[int, ...] = (0,)
    """One image per prompt and seed; seed S draws the noise diffusers / ComfyUI draw for seed S and this prompt."""
    width: int = 512
    height: int = 512
    steps: int = 20
    """Denoising steps per image."""
    guidance: float = 3.5
    """The guidance embedding's value: 3.5 for a guidance-distilled base (Flux.1-dev); 1.0 for Dev2Pro with cfg."""
    cfg: float = 1.0
    """True-CFG scale (above 1: the negative prompt is sampled too); 1.0 for a guidance-distilled base."""
    lora_scale: float = 1.0
    """Multiplies the adapters' alpha in the sampling copy only (never in training)."""
    # flux_jax.sampling.schedules.MATCHES; that layer sits above this one, so the names are repeated here.
    match: Literal["diffusers", "comfyui", "bfl"] = "diffusers"
    """Whose recipe (schedule, T5 padding, Euler form, rounding) the images reproduce."""
    batch: int = 4
    """Images per sampler call (prompt x seed pairs; each keeps its own seed's noise, so batching changes nothing)."""
    base: str = ""
    """Sample another base than the one trained (a transformer checkpoint of the same architecture, or a FLUX.1
    pipeline directory: its transformer/, or a Hub name of either, e.g. ``black-forest-labs/FLUX.1-dev``: its
    transformer/ only is fetched), with the trained LoRA on it; "" = the training base."""
    base_dtype: Literal["fp32", "bf16", "fp8"] = "fp8"
    """Storage dtype of ``base`` (frozen and only sampled: fp8 halves its HBM); sharded like the training base."""
    loss_cache: str = ""
    """A held-out dataset (a `flux-jax cache` directory, or cached examples) for the validation loss; "" = the
    held-out split of the training caches when ``data.holdout`` / ``data.holdout_count`` is set, else none."""
    loss_batches: int = 1
    """Batches of the training micro-batch size the validation loss averages over."""
    loss_seed: int = 0
    """Seeds the validation loss's fixed noise and timesteps (the same draw at every validation step)."""

    def __post_init__(self) -> None:
        every = self.every
        _require(every is None or every >= 0, "every", f"must be >= 0 or null, got {every}")
        _require(
            not (self.prompts and self.prompts_file),
            "prompts_file",
            f"set either prompts or prompts_file ({self.prompts_file!r}), not both",
        )
        for i, prompt in enumerate(self.prompts):
            _require(bool(prompt.strip()), f"prompts[{i}]", "is empty")
        _require(bool(self.seeds), "seeds", "must list at least one seed")
        for i, seed in enumerate(self.seeds):
            _require(0 <= seed < 2**64, f"seeds[{i}]", f"must be in [0, 2**64), got {seed}")
        for name in ("width", "height"):
            size = getattr(self, name)
            _require(
                size >= 16 and size % 16 == 0,
                name,
                f"must be a positive multiple of 16 (VAE /8 then 2x2 packing), got {size}",
            )
        _require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        _require(self.guidance >= 0, "guidance", f"must be >= 0, got {self.guidance}")
        _require(self.cfg >= 1.0, "cfg", f"must be >= 1 (1 = no true CFG), got {self.cfg}")
        _require(self.batch >= 1, "batch", f"must be >= 1, got {self.batch}")
        _require(self.loss_batches >= 1, "loss_batches", f"must be >= 1, got {self.loss_batches}")

    @property
    def enabled(self) -> bool:
        return bool(self.every)

    @property
    def samples(self) -> bool:
        """Whether validation draws pictures (it may only measure the loss)."""
        return bool(self.prompts or self.prompts_file)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    encoders: EncodersConfig = dataclasses.field(default_factory=EncodersConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    output_dir: str = "runs/default"

    def __post_init__(self) -> None:
        v = self.validation
        if v.enabled:  # here, not in ValidationConfig: the held-out split is the data section's
            _require(
                bool(v.samples or v.loss_cache or self.data.has_holdout),
                "validation.every",
                "is set, but there is nothing to validate: set prompts (or prompts_file) and/or loss_cache (or "
                "data.holdout)",
            )
        _require(
            not (v.loss_cache and self.data.has_holdout),
            "validation.loss_cache",
            "set either loss_cache or data.holdout / data.holdout_count (the held-out split the validation loss "
            "then reads), not both",
        )
        master = self.optim.master_dtype
        if self.train.mode == "full":
            # The base is the trainable master: stored as optim.master_dtype says (fp8 masters would lose every update).
            _require(
                self.model.base_dtype == master,
                "model.base_dtype",
                f"is {self.model.base_dtype!r}, but train.mode: full trains the base, whose master weights are "
                f"optim.master_dtype ({master!r}); set model.base_dtype: {master} (compute stays model.compute_dtype)",
            )
            _require(
                self.lora.init_from is None,
                "lora.init_from",
                "starts LoRA adapters, but train.mode: full trains the base without adapters; unset it",
            )
            _require(
                not self.validation.base,
                "validation.base",
                "samples a LoRA on another base, but train.mode: full trains the base itself; unset it",
            )
        else:
            _require(
                master == "fp32" or self.lora.dtype == "bf16",
                "lora.dtype",
                f"is {self.lora.dtype!r}, but optim.master_dtype is bf16: the adapters are the master weights; set "
                "lora.dtype: bf16",
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists: safe to ``yaml.safe_dump`` and to load back unchanged."""
        return typed_config.plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate_for_training(self, *, require_data: bool = True) -> None:
        """Checks that parsing leaves to train time because partial config files may omit them."""
        problems = []
        if not self.model.base and self.model.preset is None:
            problems.append('model.base is empty; set a checkpoint path (or model.preset with base: "")')
        if self.model.preset is not None:
            if self.model.preset not in PRESETS:
                problems.append(f"model.preset {self.model.preset!r} is not one of {sorted(PRESETS)}")
        if require_data and not (self.data.path or self.data.datasets):
            problems.append("data.path is empty (and no data.datasets)")
        if not self.output_dir:
            problems.append("output_dir is empty")
        if problems:
            raise ConfigError("config is not ready for training:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------------------------------
# Loading (the generic typed-YAML rules live in flux_jax.typed_config)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Load ``path`` (YAML), apply ``key.path=value`` overrides (values parsed as YAML), validate."""
    return typed_config.load(RunConfig, path, overrides)


def from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Build a RunConfig from plain nested mappings (the inverse of ``RunConfig.to_dict``)."""
    return typed_config.build(RunConfig, data)


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.steps=10"`` -> ``("train.steps", 10)``; checks the key against the schema (see
    ``typed_config.parse_override``)."""
    return typed_config.parse_override(RunConfig, item)


__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DatasetConfig",
    "EncodersConfig",
    "LogConfig",
    "LoraConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "ValidationConfig",
    "from_dict",
    "load_config",
    "parse_override",
]
