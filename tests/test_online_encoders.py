"""``encoders.online``: T5 and CLIP run in the training step, the cache holds token ids.

Training from an online cache equals training from a cache of text states (the same seeds, a few steps, the LoRA
params at 1e-5; with caption dropout too); the online records hold token ids and no text states and are smaller;
the encoders are in no train state, optimizer state or checkpoint; a cache of the other kind is refused in one
line; the planner's abstract step includes the encoders.

The tiny model of configs/tiny.yaml (fp32) on the 8 fake CPU devices, the generated tiny demo encoders (fp32), six
small photos in one 64x64 bucket, mirrored: 12 records.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from flux_jax import cli
from flux_jax.data.cache import CACHE_JSON, record_bytes
from flux_jax.data.cache_reader import LatentCacheReader
from flux_jax.data.encoding import load_text_towers, resolve_encoder_paths
from flux_jax.data.tfds_builders import latent_cache_features
from flux_jax.encoders.tokenizers import load_clip_tokenizer, load_t5_tokenizer, tokenize_clip, tokenize_t5
from flux_jax.errors import ConfigError, DataError
from flux_jax.model.config import PRESETS
from flux_jax.run_config import load_config
from flux_jax.sharding import make_mesh
from flux_jax.train.abstract import abstract_step
from flux_jax.train.checkpointing import read_lora_weights
from flux_jax.train.loop import train
from flux_jax.train.state import flat_params, split_trainable
from flux_jax.train.validation import open_loss_source
from tests.helpers.photo_workspace import photo_workspace, workspace_overrides

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
STEPS = 3
T5_LEN = 16
RECORDS = 12


pytestmark = pytest.mark.usefixtures("train_compile_cache")  # conftest.py


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    def caption(i: int) -> str:  # several lengths, so the T5 ids pad differently
        return f"a photo of a cat number {i}, {'very ' * i}fluffy"

    return photo_workspace(tmp_path_factory.mktemp("online"), caption)


def overrides(ws: dict[str, Path], cache: str, out: str, *extra: str) -> list[str]:
    return workspace_overrides(ws, cache, out, *extra, steps=STEPS, t5_len=T5_LEN)


def config(ws: dict[str, Path], cache: str, out: str, *extra: str):
    return load_config(TINY, overrides(ws, cache, out, *extra))


def flux_jax(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def lora(run: Path) -> dict[str, np.ndarray]:
    model, meta = read_lora_weights(run)
    assert meta["step"] == STEPS
    return {k: np.asarray(v) for k, v in flat_params(split_trainable(model)[1]).items()}


def shapes(tree) -> list:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return [(jax.tree_util.keystr(p), tuple(x.shape), str(x.dtype)) for p, x in leaves]


@pytest.fixture(scope="module")
def runs(ws: dict[str, Path]) -> dict:
    """The same run from a cache of states and online (each builds its cache first), with caption dropout 0.5."""
    out = {}
    for kind, extra in (("offline", ()), ("online", ("encoders.online=true",))):
        result = train(config(ws, f"{kind}-cache", f"{kind}-run", "data.caption_dropout=0.5", *extra), progress=False)
        assert result.step == STEPS
        out[kind] = {"result": result, "lora": lora(ws["base"] / f"{kind}-run"), "cache": ws["base"] / f"{kind}-cache"}
    return out


def test_online_training_equals_training_from_cached_states(runs: dict) -> None:
    offline, online = runs["offline"]["lora"], runs["online"]["lora"]
    assert offline.keys() == online.keys()
    moved = 0.0
    for key in offline:
        np.testing.assert_allclose(online[key], offline[key], rtol=0, atol=1e-5, err_msg=key)
        moved = max(moved, float(np.abs(offline[key]).max()))
    assert moved > 1e-3  # the LoRA trained (B starts at zero), so the comparison compares something
    losses = [runs[k]["result"].last_loss for k in ("offline", "online")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_caption_dropout_swaps_in_the_empty_caption_tokens(ws: dict[str, Path], runs: dict) -> None:
    from flux_jax.data.pipeline import make_train_iterator

    cfg = config(ws, "online-cache", "unused", "encoders.online=true", "data.caption_dropout=0.5")
    online = make_train_iterator(cfg, process_index=0, process_count=1, batch_size_per_host=8)
    cfg_off = config(ws, "offline-cache", "unused", "data.caption_dropout=0.5")
    offline = make_train_iterator(cfg_off, process_index=0, process_count=1, batch_size_per_host=8)
    a, b = next(online), next(offline)
    assert {"t5_ids", "clip_ids"} <= a.keys() and not {"t5", "clip"} & a.keys()
    dropped = a["caption_dropped"]
    np.testing.assert_array_equal(dropped, b["caption_dropped"])  # the same plan either way
    assert dropped.any() and not dropped.all()
    empty = online.cache.empty
    assert (a["t5_ids"][dropped] == empty["t5_ids"]).all() and (a["clip_ids"][dropped] == empty["clip_ids"]).all()
    assert not (a["t5_ids"][~dropped] == empty["t5_ids"]).all(axis=1).any()
    # The empty caption's ids, encoded as the step encodes them, are the offline cache's empty-caption states.
    paths, _ = resolve_encoder_paths(cfg, Path("unused"))
    text, weights = load_text_towers(paths, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]), dtype="fp32")
    t5, clip = text(weights, empty["t5_ids"][None], empty["clip_ids"][None])
    np.testing.assert_allclose(np.asarray(t5[0], np.float32), offline.cache.empty["t5"].astype(np.float32), atol=1e-6)
    np.testing.assert_allclose(np.asarray(clip[0]), offline.cache.empty["clip"], atol=1e-6)


def test_online_records_hold_token_ids_only_and_are_smaller(ws: dict[str, Path], runs: dict) -> None:
    online, offline = LatentCacheReader(runs["online"]["cache"]), LatentCacheReader(runs["offline"]["cache"])
    assert online.online and not offline.online
    assert json.loads((runs["online"]["cache"] / CACHE_JSON).read_text())["settings"]["online"] is True
    assert "online" not in json.loads((runs["offline"]["cache"] / CACHE_JSON).read_text())["settings"]
    a, b = online.read_many(range(RECORDS)), offline.read_many(range(RECORDS))
    t5_tok = load_t5_tokenizer(ws["encoders"] / "tokenizer_2")
    clip_tok = load_clip_tokenizer(ws["encoders"] / "tokenizer")
    for x, y in zip(a, b, strict=True):
        assert not {"t5", "clip"} & x.keys()
        assert x["t5_ids"].dtype == np.int32 and x["t5_ids"].shape == (T5_LEN,)
        assert x["clip_ids"].dtype == np.int32 and x["clip_ids"].shape == (77,)
        caption = x["caption"].decode()
        np.testing.assert_array_equal(x["t5_ids"], tokenize_t5(t5_tok, [caption], T5_LEN).input_ids[0])
        np.testing.assert_array_equal(x["clip_ids"], tokenize_clip(clip_tok, [caption]).input_ids[0])
        np.testing.assert_array_equal(np.asarray(x["latents"]), np.asarray(y["latents"]))  # the same latents
    # Per record as stored (the serialized example; a shard file is padded to Riegeli's 64 KiB blocks, so at 12
    # tiny records the files are the same size): smaller by exactly what record_bytes says, give or take framing.
    stored = {k: np.mean([len(latent_cache_features(c.shapes).serialize_example(r)) for r in recs])
              for k, c, recs in (("online", online, a), ("offline", offline, b))}  # fmt: skip
    tokens = 16  # 64x64 px: 4x4 latent tokens
    sizes = {k: record_bytes(c.shapes, tokens) for k, c in (("online", online), ("offline", offline))}
    assert sizes["online"] == 2 * 64 * tokens + 4 * (T5_LEN + 77)
    assert sizes["offline"] == 2 * 64 * tokens + 2 * T5_LEN * offline.shapes["t5_dim"] + 4 * offline.shapes["clip_dim"]
    assert stored["online"] < stored["offline"]
    assert abs((stored["offline"] - stored["online"]) - (sizes["offline"] - sizes["online"])) < 16
    with pytest.raises(DataError, match="token ids"):
        online.read(0)


def test_the_encoders_are_in_no_state_optimizer_or_checkpoint(ws: dict[str, Path], runs: dict) -> None:
    offline, online = runs["offline"]["result"].state, runs["online"]["result"].state
    assert shapes(online) == shapes(offline)  # LoRA, optimizer state and EMA: the same leaves, nothing more
    names = " ".join(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(online))
    assert "t5" not in names.lower() and "clip" not in names.lower()
    # What each checkpoint stores (orbax's tree of every saved item): the same arrays, online or not.
    for item in ("lora", "train"):
        trees = [
            json.loads((ws["base"] / f"{k}-run" / "checkpoints" / str(STEPS) / item / "_METADATA").read_text())
            for k in ("offline", "online")
        ]
        saved = [sorted(t["tree_metadata"]) for t in trees]
        assert saved[0] and saved[1] == saved[0], item
        assert not [k for k in saved[1] if "t5" in k.lower() or "clip" in k.lower()]
    assert runs["online"]["lora"].keys() == runs["offline"]["lora"].keys()


def test_a_cache_of_the_other_kind_is_refused_in_one_line(ws: dict[str, Path], runs: dict) -> None:
    for cache, online in (("offline-cache", "true"), ("online-cache", "false")):
        argv = [*overrides(ws, cache, f"refused-{online}"), f"encoders.online={online}"]
        rc, out, err = flux_jax("train", "--config", str(TINY), *argv, "--no-progress")
        assert rc == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert "this cache holds T5 / CLIP" in lines[0] and f"set encoders.online: {online}" not in lines[0]
        assert f"this config needs T5 / CLIP {'token ids' if online == 'true' else 'states'}" in lines[0]
        rc, out, err = flux_jax("cache", "--config", str(TINY), *argv, "--no-progress")
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "this cache holds" in err, err
    with pytest.raises(ConfigError, match="token ids"):
        open_loss_source(str(runs["online"]["cache"]))
    assert open_loss_source(str(runs["offline"]["cache"])) is not None  # a cache of states serves either run


def test_the_planned_step_includes_the_encoders(ws: dict[str, Path]) -> None:
    mesh = make_mesh(-1, 1, 1)
    steps = {}
    for kind, extra in (("offline", ()), ("online", ("encoders.online=true",))):
        cfg = config(ws, f"{kind}-cache", "unused", "model.remat=none", *extra)
        steps[kind] = abstract_step(cfg, mesh, model_config=PRESETS["tiny"])
    online = steps["online"]
    assert online.compiler.abstract_encoders is not None and steps["offline"].compiler.abstract_encoders is None
    batch = online.batch(batch_size=8, grad_accum=1, resolution=64, text_len=T5_LEN)
    assert sorted(batch) == ["clip_ids", "img_ids", "latents", "t5_ids"]
    encoder_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(online.compiler.abstract_encoders))
    assert encoder_bytes > 0
    assert any(n.startswith("encoders.online: the step runs T5 and CLIP") for n in online.notes)
    compiled = online.compile(batch)  # the trainer's executable, with T5 and CLIP inside
    # Data parallel: every device holds the base and the encoders whole, both step arguments (beside state, batch).
    base_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(online.frozen))
    assert compiled.memory_analysis().argument_size_in_bytes >= base_bytes + encoder_bytes
