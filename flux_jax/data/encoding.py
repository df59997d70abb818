"""The frozen encoders of `flux-jax cache`: located from the config, loaded sharded on the mesh, run jitted.

`FluxEncoders.encode` takes this host's rows of a global batch (images already rendered into one bucket, and
their captions) and returns this host's rows of the cached fields. The batch is split over the mesh's data and
fsdp axes; weights follow the logical-axis rules (T5-XXL's ``embed`` dim is FSDP-sharded, the 84M-parameter VAE
and the CLIP tower are replicated).

With ``encoders.online`` the cache holds token ids (`FluxEncoders.tokens`) and the trainer runs T5 and CLIP in its
step: `TextTowers` (their graphs) with their weights from `load_text_towers` (or `abstract_text_towers` for the
planner). Both ways compute the states with the one function `text_states`, rounded to the dtypes the cache stores
(`T5_STORAGE`, `CLIP_STORAGE`), so they feed the transformer the same values.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from flux_jax import hub
from flux_jax.axes import DEFAULT_RULES
from flux_jax.dtypes import dtype_name, parse_dtype
from flux_jax.encoders.clip import CLIPTextConfig, CLIPTextModel, load_clip
from flux_jax.encoders.t5 import T5Config, T5Encoder, load_t5
from flux_jax.encoders.tokenizers import load_clip_tokenizer, load_t5_tokenizer, tokenize_clip, tokenize_t5
from flux_jax.encoders.vae import AutoEncoder, VAEConfig, load_vae, normalize_latents
from flux_jax.errors import CheckpointError, FluxJaxError
from flux_jax.lora_io.text_encoders import TITLES, TextEncoderLoras, check_fits, merge_into_state
from flux_jax.lora_io.weights import LoraWeights
from flux_jax.model.latents import pack_latents
from flux_jax.sharding import batch_sharding, state_shardings
from flux_jax.weights.safetensors_file import SafetensorsFile

log = logging.getLogger(__name__)

# The encoders' logical axes beyond the transformer's vocabulary: VAE conv channels and embedding rows stay
# replicated (the VAE is small; the 32k x 4096 T5 embedding is sharded along "embed" already).
ENCODER_RULES: tuple[tuple[str, Any], ...] = (*DEFAULT_RULES, ("conv_in", None), ("conv_out", None), ("vocab", None))

# FLUX.1 diffusers download: component -> sub-folder.
ROOT_LAYOUT = {
    "vae": "vae",
    "clip": "text_encoder",
    "t5": "text_encoder_2",
    "clip_tokenizer": "tokenizer",
    "t5_tokenizer": "tokenizer_2",
}
ENCODER_DTYPES = ("fp32", "bf16")
# The dtypes the cache stores the text states in, and the online states are rounded to.
T5_STORAGE = jnp.bfloat16
CLIP_STORAGE = jnp.float32


@dataclasses.dataclass(frozen=True)
class EncoderPaths:
    vae: Path
    t5: Path
    clip: Path
    t5_tokenizer: Path
    clip_tokenizer: Path

    def identity(self) -> dict[str, Any]:
        """What the cache fingerprint records: each weight/tokenizer file's path, size and mtime."""
        out = {}
        for name, path in dataclasses.asdict(self).items():
            files = sorted(p for p in ([path] if path.is_file() else path.iterdir()) if p.is_file())
            out[name] = [(str(p.resolve()), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
        return out


def resolve_encoder_paths(cfg: Any, demo_dir: Path) -> tuple[EncoderPaths, str | None]:
    """The paths an `EncodersConfig` names; (paths, demo stamp) where the demo encoders are generated into
    ``demo_dir`` when nothing is configured. A partially configured set is an error, not a silent demo. Hugging
    Face Hub names (`flux_jax.hub`) are fetched first: only the encoders' folders of ``root``, only the named
    encoder's folder (or file) of each of the others."""
    from flux_jax.data.demo import build_demo_encoders

    enc = cfg.encoders
    given = {name: getattr(enc, name) for name in ROOT_LAYOUT}
    stamp = demo_stamp(cfg)
    if stamp is not None:
        root = build_demo_encoders(demo_dir, seed=enc.demo_seed, dims=_demo_dims(cfg.model.preset))
    elif enc.root:
        root, stamp = Path(_fetched("root", enc.root)), None
    else:
        missing = [f"encoders.{name}" for name, value in given.items() if not value]
        if missing:
            raise FluxJaxError(f"set encoders.root, or every one of {', '.join(missing)} too")
        root, stamp = Path("."), None
    paths = {name: Path(_fetched(name, value)) if value else root / ROOT_LAYOUT[name] for name, value in given.items()}
    for name, path in paths.items():
        if not path.exists():
            raise CheckpointError(f"encoders.{name}: {path} does not exist")
    return EncoderPaths(**paths), stamp


def _fetched(name: str, value: str) -> str:
    """``encoders.<name>``'s value resolved (a Hub name fetched: the pipeline's encoders for ``root``, the
    encoder's own folder for the others), its errors naming the key."""
    try:
        return hub.resolve_encoders(value) if name == "root" else hub.resolve_folder(value, ROOT_LAYOUT[name])
    except CheckpointError as e:
        raise CheckpointError(f"encoders.{name}: {e}") from None


def demo_stamp(cfg: Any) -> str | None:
    """What the cache fingerprint records for the generated demo encoders (used when none are configured), or
    None when encoders are configured. Generates nothing."""
    enc = cfg.encoders
    if enc.root or any(getattr(enc, name) for name in ROOT_LAYOUT):
        return None
    dims = _demo_dims(cfg.model.preset)
    return f"demo-seed{enc.demo_seed}-{dims.t5_dim}x{dims.clip_dim}"


def _demo_dims(preset: str | None) -> Any:
    from flux_jax.data.demo import DemoDims
    from flux_jax.model.config import PRESETS

    model = PRESETS.get(preset or "tiny", PRESETS["tiny"])
    return DemoDims(t5_dim=model.context_in_dim, clip_dim=model.vec_in_dim)


def read_state(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All tensors of a safetensors file, or of every ``*.safetensors`` in a directory, and its config.json
    (empty when there is none). Never unpickles anything."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors weights (pickled .bin checkpoints are not read)")
    state: dict[str, np.ndarray] = {}
    for file in files:
        reader = SafetensorsFile(file)
        for name in reader.keys():
            state[name] = reader.array(name)
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    config = json.loads(config_file.read_text()) if path.is_dir() and config_file.is_file() else {}
    return state, config


def _on_host_cpu():
    # Build on the host CPU first: a T5-XXL converted on accelerator 0 would not fit next to its copy.
    return jax.default_device(jax.local_devices(backend="cpu")[0])


def read_vae(path: Path, dtype: str = "bf16") -> AutoEncoder:
    """The VAE of a diffusers ``vae/`` directory or a BFL ``ae.safetensors`` file, on the host CPU."""
    with _on_host_cpu():
        state, config = read_state(path)
        return load_vae(state, VAEConfig.from_diffusers(config) if config else None, parse_dtype(dtype, ENCODER_DTYPES))


def _with_lora(component: str, path: Path, state: dict, lora: Mapping[str, LoraWeights] | None, dtype) -> dict:
    if not lora:
        return state
    where = f"text-encoder LoRA on {path}"
    log.info("merging %d LoRA module(s) into the %s text encoder %s", len(lora), TITLES[component], path)
    return merge_into_state(component, state, lora, dtype=dtype, where=where)


def read_t5(path: Path, dtype: str = "bf16", *, lora: Mapping[str, LoraWeights] | None = None) -> T5Encoder:
    """The T5 encoder of a transformers ``T5EncoderModel`` directory, on the host CPU; ``lora`` (T5 modules, see
    `flux_jax.lora_io.text_encoders`) is merged into its weights first, in float32, rounded once to ``dtype``."""
    with _on_host_cpu():
        state, config = read_state(path)
        target = parse_dtype(dtype, ENCODER_DTYPES)
        return load_t5(
            _with_lora("t5", path, state, lora, target), T5Config.from_hf(config) if config else None, target
        )


def read_clip(path: Path, dtype: str = "bf16", *, lora: Mapping[str, LoraWeights] | None = None) -> CLIPTextModel:
    """The CLIP text tower of a transformers ``CLIPTextModel`` directory, on the host CPU; ``lora`` (CLIP modules)
    is merged into its weights first, as for `read_t5`."""
    with _on_host_cpu():
        state, config = read_state(path)
        target = parse_dtype(dtype, ENCODER_DTYPES)
        cfg = CLIPTextConfig.from_hf(config) if config else None
        return load_clip(_with_lora("clip", path, state, lora, target), cfg, target)


def check_text_encoder_lora(paths: EncoderPaths, loras: TextEncoderLoras, where: str) -> None:
    """The text-encoder LoRA parts fit the encoders ``paths`` names (read from the safetensors headers alone)."""
    for component, folder in (("clip", paths.clip), ("t5", paths.t5)):
        if not loras.get(component):
            continue
        files = [folder] if folder.is_file() else sorted(folder.glob("*.safetensors"))
        shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with SafetensorsFile(file) as reader:
                shapes.update({name: tuple(reader.info(name).shape) for name in reader.keys()})
        check_fits(component, shapes, loras[component], f"{where} on {folder}")


def encoder_rules(rules: Any = DEFAULT_RULES) -> tuple[tuple[str, Any], ...]:
    """The encoders' rules: a run's ``mesh.rules`` (default the transformer's) plus the encoder-only names."""
    return (*tuple(rules), *ENCODER_RULES[len(DEFAULT_RULES) :])


def place(model: nnx.Module, mesh: Mesh, rules: Any = ENCODER_RULES) -> tuple[nnx.GraphDef, nnx.State]:
    """An encoder split into its graph and its weights, placed on ``mesh`` by ``rules`` (`encoder_rules`)."""
    graphdef, state = nnx.split(model)

    def put(value: jax.Array, sharding: NamedSharding) -> jax.Array:
        # From a host copy: on several hosts a single-device array cannot be resharded onto the global mesh,
        # while every process holding the same host value can fill its own shards.
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return graphdef, jax.tree.map(put, state, state_shardings(state, mesh, rules))


class FluxEncoders:
    """VAE + T5 + CLIP and their tokenizers, placed on ``mesh``."""

    def __init__(
        self,
        vae: AutoEncoder,
        t5: T5Encoder,
        clip: CLIPTextModel,
        t5_tokenizer: Any,
        clip_tokenizer: Any,
        *,
        mesh: Mesh,
        t5_max_length: int = 512,
        paths: EncoderPaths | None = None,
    ):
        """From built models (`load` reads them from checkpoints); their weights are resharded onto ``mesh``."""
        self.paths = paths
        self.mesh = mesh
        self.t5_max_length = t5_max_length
        dtype = jax.tree.leaves(nnx.state(vae))[0].dtype
        self.dtype = dtype_name(dtype, ENCODER_DTYPES)
        self.vae_config: VAEConfig = vae.config
        self.t5_dim = t5.config.d_model
        self.clip_dim = clip.config.hidden_size
        self.t5_tokenizer = t5_tokenizer
        self.clip_tokenizer = clip_tokenizer
        self._vae, self._t5, self._clip = (self._place(m) for m in (vae, t5, clip))
        self._batch = batch_sharding(mesh)
        # One compiled program per architecture, dtype and mesh, shared by every FluxEncoders in the process (a
        # resumed cache, the next test) instead of compiling again; the graph is fixed by that key.
        key = (self.vae_config, t5.config, clip.config, dtype, self._batch)
        if key not in _COMPILED:
            _COMPILED[key] = (
                jax.jit(functools.partial(_images, self._vae[0], dtype, self._batch)),
                jax.jit(functools.partial(_text, self._t5[0], self._clip[0], self._batch)),
            )
        self._images_fn, self._text_fn = _COMPILED[key]

    @classmethod
    def load(cls, paths: EncoderPaths, *, mesh: Mesh, dtype: str = "bf16", t5_max_length: int = 512) -> FluxEncoders:
        """Read the three checkpoints and two tokenizers that ``paths`` names."""
        vae, t5, clip = read_vae(paths.vae, dtype), read_t5(paths.t5, dtype), read_clip(paths.clip, dtype)
        tokenizers = load_t5_tokenizer(paths.t5_tokenizer), load_clip_tokenizer(paths.clip_tokenizer)
        return cls(vae, t5, clip, *tokenizers, mesh=mesh, t5_max_length=t5_max_length, paths=paths)

    def _place(self, model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
        return place(model, self.mesh)

    @property
    def latent_dim(self) -> int:
        return 4 * self.vae_config.latent_channels

    def batch_multiple(self) -> int:
        """Global batches must be a multiple of this: the devices the batch is split over."""
        return int(self.mesh.shape["data"] * self.mesh.shape["fsdp"])

    def encode(self, images: np.ndarray, captions: Sequence[str], global_batch: int) -> dict[str, np.ndarray]:
        """This host's rows: images [b, H, W, 3] float32 in [-1, 1] and b captions, where the global batch of
        ``global_batch`` rows is split evenly over processes. Returns latents [b, L, 4C] bf16, t5 [b, Lt, D] bf16
        and clip [b, D'] float32, for this host's rows in the same order."""
        images = self._global(images, global_batch)
        latents = _local_rows(self._images_fn(self._vae[1], images))
        return {"latents": latents, **self.encode_text(captions, global_batch)}

    def encode_text(self, captions: Sequence[str], global_batch: int) -> dict[str, np.ndarray]:
        """T5 states and CLIP pooled vectors of this host's captions (see `encode`)."""
        t5_ids = tokenize_t5(self.t5_tokenizer, captions, self.t5_max_length).input_ids
        clip_ids = tokenize_clip(self.clip_tokenizer, captions).input_ids
        t5, pooled = self._text_fn(
            self._t5[1],
            self._clip[1],
            self._global(t5_ids, global_batch),
            self._global(clip_ids, global_batch),
        )
        return {"t5": _local_rows(t5), "clip": _local_rows(pooled)}

    def encode_images(self, images: np.ndarray, global_batch: int) -> np.ndarray:
        """The latents of this host's images (see `encode`)."""
        return _local_rows(self._images_fn(self._vae[1], self._global(images, global_batch)))

    def tokens(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
        """What an online cache holds instead of `encode_text`'s states: ``t5_ids`` [b, t5_max_length] and
        ``clip_ids`` [b, 77] int32, tokenized exactly as `encode_text` tokenizes them before encoding."""
        t5_ids = tokenize_t5(self.t5_tokenizer, captions, self.t5_max_length).input_ids
        clip_ids = tokenize_clip(self.clip_tokenizer, captions).input_ids
        return {"t5_ids": np.asarray(t5_ids, np.int32), "clip_ids": np.asarray(clip_ids, np.int32)}

    def _global(self, local: np.ndarray, global_batch: int) -> jax.Array:
        shape = (global_batch, *local.shape[1:])
        return jax.make_array_from_process_local_data(self._batch, np.ascontiguousarray(local), shape)


_COMPILED: dict[tuple, tuple[Any, Any]] = {}


def _images(graphdef: nnx.GraphDef, dtype: Any, out: NamedSharding, state: nnx.State, images: jax.Array) -> jax.Array:
    vae = nnx.merge(graphdef, state)
    z = vae.encode(images.astype(dtype)).astype(jnp.float32)
    latents = pack_latents(normalize_latents(z, vae.config)).astype(jnp.bfloat16)
    return jax.lax.with_sharding_constraint(latents, out)


def _text(
    t5_def: nnx.GraphDef,
    clip_def: nnx.GraphDef,
    out: NamedSharding,
    t5_state: nnx.State,
    clip_state: nnx.State,
    t5_ids: jax.Array,
    clip_ids: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    hidden, pooled = text_states(t5_def, clip_def, t5_state, clip_state, t5_ids, clip_ids)
    return jax.lax.with_sharding_constraint(hidden, out), jax.lax.with_sharding_constraint(pooled, out)


def text_states(
    t5_def: nnx.GraphDef,
    clip_def: nnx.GraphDef,
    t5_state: nnx.State,
    clip_state: nnx.State,
    t5_ids: jax.Array,
    clip_ids: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """T5 last hidden states [B, L, D] in `T5_STORAGE` and CLIP pooled vectors [B, D'] in `CLIP_STORAGE`: what the
    cache stores, and what the online step computes (the same function, so the two agree)."""
    # Flux feeds both encoders without an attention mask: T5 attends to its padding, CLIP is causal anyway.
    hidden = nnx.merge(t5_def, t5_state)(t5_ids).astype(T5_STORAGE)
    _, pooled = nnx.merge(clip_def, clip_state)(clip_ids)
    return hidden, pooled.astype(CLIP_STORAGE)


@dataclasses.dataclass(frozen=True)
class TextTowers:
    """T5 and CLIP as the online training step runs them: their graphs (static) and dims; the weights are a
    separate argument ({"t5": state, "clip": state}, from `load_text_towers`), frozen: the step differentiates
    only its LoRA, and stops gradients at the states anyway."""

    t5_def: nnx.GraphDef
    clip_def: nnx.GraphDef
    t5_dim: int
    clip_dim: int

    def __call__(self, weights: Mapping[str, nnx.State], t5_ids: jax.Array, clip_ids: jax.Array):
        hidden, pooled = text_states(self.t5_def, self.clip_def, weights["t5"], weights["clip"], t5_ids, clip_ids)
        return jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(pooled)


def load_text_towers(
    paths: EncoderPaths, *, mesh: Mesh, rules: Any = DEFAULT_RULES, dtype: str = "bf16"
) -> tuple[TextTowers, dict[str, nnx.State]]:
    """T5 and CLIP read from ``paths`` and placed on ``mesh`` by `encoder_rules` (``rules``: the run's), as the
    cache build places them: (their graphs, their weights)."""
    t5, clip = read_t5(paths.t5, dtype), read_clip(paths.clip, dtype)
    dims = t5.config.d_model, clip.config.hidden_size
    (t5_def, t5_state), (clip_def, clip_state) = (place(m, mesh, encoder_rules(rules)) for m in (t5, clip))
    return TextTowers(t5_def, clip_def, *dims), {"t5": t5_state, "clip": clip_state}


def abstract_text_towers(
    t5_config: T5Config, clip_config: CLIPTextConfig, *, mesh: Mesh, rules: Any = DEFAULT_RULES, dtype: str = "bf16"
) -> tuple[TextTowers, dict[str, nnx.State]]:
    """`load_text_towers` in shapes only (the planner): weights are ShapeDtypeStructs with their shardings."""
    target = parse_dtype(dtype, ENCODER_DTYPES)
    out = {}
    for name, make in (
        ("t5", lambda: T5Encoder(t5_config, dtype=target, param_dtype=target, rngs=nnx.Rngs(0))),
        ("clip", lambda: CLIPTextModel(clip_config, dtype=target, param_dtype=target, rngs=nnx.Rngs(0))),
    ):
        graphdef, state = nnx.split(nnx.eval_shape(make))
        shardings = state_shardings(state, mesh, encoder_rules(rules))
        out[name] = graphdef, jax.tree.map(_abstract_on, state, shardings)
    towers = TextTowers(out["t5"][0], out["clip"][0], t5_config.d_model, clip_config.hidden_size)
    return towers, {"t5": out["t5"][1], "clip": out["clip"][1]}


def _abstract_on(x: Any, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def text_tower_configs(cfg: Any) -> tuple[T5Config, CLIPTextConfig, str | None]:
    """The T5 / CLIP architectures an ``encoders`` section names, for the planner: the generated demo encoders',
    those of local checkpoints' config.json, else FLUX.1's (T5-XXL, CLIP-L) with a note saying so. Downloads
    nothing."""
    import tempfile

    if demo_stamp(cfg) is not None:
        with tempfile.TemporaryDirectory(prefix="flux_jax_demo_encoders_") as tmp:
            paths, _ = resolve_encoder_paths(cfg, Path(tmp))
            return _config_of(paths.t5, T5Config.from_hf), _config_of(paths.clip, CLIPTextConfig.from_hf), None
    enc = cfg.encoders
    found = []
    for name, parse in (("t5", T5Config.from_hf), ("clip", CLIPTextConfig.from_hf)):
        folder = Path(getattr(enc, name) or (Path(enc.root) / ROOT_LAYOUT[name] if enc.root else ""))
        found.append(_config_of(folder, parse) if getattr(enc, name) or enc.root else None)
    if all(found):
        return found[0], found[1], None
    note = "the T5 / CLIP checkpoints are not on this machine: planned FLUX.1's T5-XXL and CLIP-L"
    return found[0] or T5Config(), found[1] or CLIPTextConfig(), note


def _config_of(folder: Path, parse: Any) -> Any:
    config = folder / "config.json" if folder.is_dir() else None
    return parse(json.loads(config.read_text())) if config is not None and config.is_file() else None


def _local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in global row order (replicas along other axes dropped)."""
    shards: dict[int, np.ndarray] = {}
    for shard in array.addressable_shards:
        start = shard.index[0].start or 0
        if start not in shards:
            shards[start] = np.asarray(shard.data)
    return np.concatenate([shards[s] for s in sorted(shards)], axis=0)


def fingerprint_text(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]
