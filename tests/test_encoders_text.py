"""T5 v1.1 encoder and CLIP text tower: fp32 parity with transformers, key tables, tokenizers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flux_jax.encoders.clip import (
    LEGACY_EOS_TOKEN_ID,
    CLIPTextConfig,
    CLIPTextModel,
    eos_positions,
    export_clip,
    infer_clip_config,
    load_clip,
)
from flux_jax.encoders.keys import path_str
from flux_jax.encoders.t5 import (
    T5Config,
    T5Encoder,
    export_t5,
    infer_t5_config,
    load_t5,
    relative_position_buckets,
)
from flux_jax.encoders.tokenizers import (
    CLIP_MAX_LENGTH,
    T5_MAX_LENGTH,
    build_tiny_tokenizers,
    load_clip_tokenizer,
    load_t5_tokenizer,
    tokenize_clip,
    tokenize_t5,
)
from flux_jax.errors import CheckpointError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4  # fp32 parity; never loosen (see style_anchors.md lesson 8)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter, norm weights included, so a mis-mapped tensor shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.ndim == 1 else 0.0) * p)


def _numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in module.state_dict().items()}


def _logical_axes(model: nnx.Module) -> dict[str, tuple]:
    return {
        path_str(p): v.get_metadata().get("logical_axes") for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


# --------------------------------------------------------------------------------------------------
# T5

T5_CFG = T5Config.tiny()


@pytest.fixture(scope="module")
def t5_ref() -> torch.nn.Module:
    model = transformers.T5EncoderModel(transformers.T5Config(**T5_CFG.to_hf())).eval()
    _randomize(model, seed=0)
    return model


@pytest.fixture(scope="module")
def t5_state(t5_ref) -> dict[str, np.ndarray]:
    return _numpy_state(t5_ref)


@nnx.jit
def _t5(model: T5Encoder, ids: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    return model(ids, mask)


@pytest.mark.parametrize("use_mask", [False, True])
def test_t5_matches_transformers(t5_ref, t5_state, use_mask):
    model = load_t5(t5_state, T5_CFG)
    # Longer than max_distance (128) so the logarithmic and clamped buckets are exercised too.
    ids = np.random.RandomState(0).randint(0, T5_CFG.vocab_size, (2, 150))
    mask = np.ones_like(ids)
    mask[1, 100:] = 0
    with torch.no_grad():
        want = t5_ref(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask) if use_mask else None
        ).last_hidden_state.numpy()
    ours = np.asarray(_t5(model, jnp.asarray(ids), jnp.asarray(mask) if use_mask else None))
    np.testing.assert_allclose(ours, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (32, 16)])
def test_t5_buckets_match_transformers_exactly(num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    n = 700
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    want = T5Attention._relative_position_bucket(rel, True, num_buckets, max_distance).numpy()
    np.testing.assert_array_equal(relative_position_buckets(n, n, num_buckets, max_distance), want)


def test_t5_export_round_trip_and_tied_embeddings(t5_state):
    model = load_t5(t5_state, T5_CFG)
    exported = export_t5(model)
    assert exported.keys() == t5_state.keys()
    fresh = transformers.T5EncoderModel(transformers.T5Config(**T5_CFG.to_hf()))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), t5_state[k], err_msg=k)

    # Files may hold either tied name; both copies present must agree.
    only_shared = {k: v for k, v in t5_state.items() if k != "encoder.embed_tokens.weight"}
    only_encoder = {k: v for k, v in t5_state.items() if k != "shared.weight"}
    for partial in (only_shared, only_encoder):
        np.testing.assert_array_equal(export_t5(load_t5(partial, T5_CFG))["shared.weight"], t5_state["shared.weight"])
    untied = dict(t5_state, **{"encoder.embed_tokens.weight": t5_state["shared.weight"] + 1})
    with pytest.raises(CheckpointError, match="tied"):
        load_t5(untied, T5_CFG)


def test_t5_config_and_errors(t5_ref, t5_state):
    assert T5Config.from_hf(t5_ref.config.to_dict()) == T5_CFG
    assert infer_t5_config(t5_state) == T5_CFG
    bad = {k: v for k, v in t5_state.items() if "block.1.layer.1.layer_norm" not in k}
    bad["decoder.block.0.layer.0.layer_norm.weight"] = np.ones(T5_CFG.d_model, np.float32)
    with pytest.raises(CheckpointError) as e:
        load_t5(bad, T5_CFG)
    assert "encoder.block.1.layer.1.layer_norm.weight" in str(e.value)
    assert "decoder.block.0.layer.0.layer_norm.weight" in str(e.value)
    with pytest.raises(ValueError, match="gated"):
        T5Config.from_hf({"feed_forward_proj": "relu"})


def test_t5_logical_axes(t5_state):
    axes = _logical_axes(load_t5(t5_state, T5_CFG))
    assert axes["embed.embedding"] == ("vocab", "embed")
    assert axes["blocks.0.q.kernel"] == ("embed", "heads")
    assert axes["blocks.1.wi_0.kernel"] == ("embed", "mlp")
    assert axes["blocks.1.wo.kernel"] == ("mlp", "embed")
    assert axes["relative_attention_bias.embedding"] == (None, "heads")


def test_t5_xxl_preset():
    cfg = T5Config.xxl()
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.vocab_size) == (
        4096,
        24,
        64,
        64,
        10240,
        32128,
    )


# --------------------------------------------------------------------------------------------------
# CLIP

# eos 2: legacy configs (FLUX.1's), pooled at argmax(input_ids). 97: a fixed config, pooled at the
# first occurrence of that id even though higher ids appear in the sequence.
CLIP_EOS = (2, 97)


def _clip_ref(eos: int) -> tuple[CLIPTextConfig, torch.nn.Module]:
    cfg = CLIPTextConfig.tiny(eos_token_id=eos)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_hf())).eval()
    _randomize(model, seed=eos)
    return cfg, model


def _clip_ids() -> np.ndarray:
    ids = np.random.RandomState(1).randint(3, 90, (3, 16))
    ids[0, 5] = 98  # largest id once: legacy pools here
    ids[1, 9:] = 97  # eos then eos-as-padding: first occurrence
    ids[2, [3, 7]] = 97
    ids[2, 10] = 98
    return ids


@nnx.jit
def _clip(model: CLIPTextModel, ids: jnp.ndarray, mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    return model(ids, mask)


@pytest.mark.parametrize("eos", CLIP_EOS)
@pytest.mark.parametrize("use_mask", [False, True])
def test_clip_matches_transformers(eos, use_mask):
    cfg, ref = _clip_ref(eos)
    model = load_clip(_numpy_state(ref), cfg)
    ids = _clip_ids()
    mask = np.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask) if use_mask else None)
    hidden, pooled = _clip(model, jnp.asarray(ids), jnp.asarray(mask) if use_mask else None)
    np.testing.assert_allclose(np.asarray(hidden), out.last_hidden_state.numpy(), rtol=0, atol=TOL)
    np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), rtol=0, atol=TOL)
    want_pos = [5, 9, 10] if eos == 2 else [0, 9, 3]  # row 0 has no 97: torch argmax of all-False is 0
    np.testing.assert_array_equal(np.asarray(eos_positions(jnp.asarray(ids), eos)), want_pos)


def test_clip_legacy_prefix_round_trip():
    cfg, ref = _clip_ref(CLIP_EOS[0])
    state = _numpy_state(ref)
    # transformers < 5 files: `text_model.` prefix and the position_ids buffer saved alongside.
    legacy = {"text_model." + k: v for k, v in state.items()}
    legacy["text_model.embeddings.position_ids"] = np.arange(cfg.max_position_embeddings)[None]
    model = load_clip(legacy, cfg)
    assert infer_clip_config(legacy, CLIPTextConfig(num_attention_heads=cfg.num_attention_heads)) == cfg
    exported = export_clip(model)
    assert exported.keys() == state.keys()
    fresh = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_hf()))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), state[k], err_msg=k)
    assert set(export_clip(model, legacy_prefix=True)) == set(legacy) - {"text_model.embeddings.position_ids"}
    assert CLIPTextConfig.from_hf(ref.config.to_dict()) == cfg


def test_clip_errors_and_logical_axes():
    cfg, ref = _clip_ref(CLIP_EOS[0])
    state = _numpy_state(ref)
    bad = dict(state, **{"text_projection.weight": np.zeros((4, 4), np.float32)})
    bad["encoder.layers.0.mlp.fc1.weight"] = bad["encoder.layers.0.mlp.fc1.weight"].T
    with pytest.raises(CheckpointError) as e:
        load_clip(bad, cfg)
    assert "text_projection.weight" in str(e.value) and "encoder.layers.0.mlp.fc1.weight" in str(e.value)
    axes = _logical_axes(load_clip(state, cfg))
    assert axes["token_embedding.embedding"] == ("vocab", "embed")
    assert axes["position_embedding.embedding"] == (None, "embed")
    assert axes["layers.0.fc1.kernel"] == ("embed", "mlp")
    assert axes["layers.1.out_proj.bias"] == ("embed",)


# --------------------------------------------------------------------------------------------------
# Tokenizers


@pytest.fixture(scope="module")
def tiny_tokenizers(tmp_path_factory):
    clip_dir, t5_dir = build_tiny_tokenizers(tmp_path_factory.mktemp("tok"))
    return load_clip_tokenizer(clip_dir), load_t5_tokenizer(t5_dir)


def test_tiny_t5_tokenizer(tiny_tokenizers):
    _, t5 = tiny_tokenizers
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    tokens = tokenize_t5(t5, ["a photo of a cat", "a zebra"])
    assert tokens.input_ids.shape == tokens.attention_mask.shape == (2, T5_MAX_LENGTH)
    assert tokens.input_ids.dtype == np.int32
    first = tokens.input_ids[0]
    n = int(tokens.attention_mask[0].sum())
    assert n == 6  # five corpus words stay whole, then </s>
    assert first[n - 1] == t5.eos_token_id and (first[n:] == t5.pad_token_id).all()
    assert int(tokens.attention_mask[1].sum()) > 3  # "zebra" is not in the corpus: spelled out
    long = tokenize_t5(t5, ["cat " * 1000])
    assert long.input_ids.shape == (1, T5_MAX_LENGTH) and long.input_ids[0, -1] == t5.eos_token_id


def test_tiny_clip_tokenizer_feeds_clip(tiny_tokenizers):
    clip, _ = tiny_tokenizers
    bos, eos = clip.bos_token_id, clip.eos_token_id
    assert clip.pad_token_id == eos == len(clip) - 1  # end-of-text is the largest id, as in CLIP-L
    tokens = tokenize_clip(clip, ["A photo of a cat", "a cat " * 100])
    assert tokens.input_ids.shape == (2, CLIP_MAX_LENGTH)
    short = tokens.input_ids[0]
    assert short[0] == bos and list(short[1:7]) == [
        *clip.convert_tokens_to_ids(["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]),
        eos,
    ]
    assert (short[7:] == eos).all()
    assert tokens.input_ids[1, -1] == eos  # truncated, end-of-text kept
    # Legacy pooling over the tiny vocabulary picks the first end-of-text token.
    pooled_at = eos_positions(jnp.asarray(tokens.input_ids), LEGACY_EOS_TOKEN_ID)
    np.testing.assert_array_equal(np.asarray(pooled_at), [6, CLIP_MAX_LENGTH - 1])
