"""W&B as an optional tracker, in offline mode: the scalars and images of a run reach its W&B run, read back from
W&B's own record file, and a resumed run continues the same run id without re-sending the steps it logged."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux_jax.errors import ConfigError
from flux_jax.run_config import WandbConfig, from_dict, load_config
from flux_jax.train.metrics import MetricsWriter
from flux_jax.train.wandb_tracker import ID_FILE

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = WandbConfig(project="flux-jax-test", mode="offline", name="tiny")


@pytest.fixture(autouse=True)
def _quiet_offline_wandb(tmp_path, monkeypatch):
    for key, value in {
        "WANDB_SILENT": "true",
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_DISABLE_GIT": "true",
    }.items():
        monkeypatch.setenv(key, value)


def wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B ``.wandb`` file: a 7-byte header (":W&B", version), then LevelDB-style log blocks of
    32 KiB, each record in pieces of (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    out, pos, pending, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if (pos % block) + 7 > block:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        piece, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = piece if kind in (1, 2) else pending + piece
        if kind in (1, 4):
            out.append(pending)
            pending = b""
    return out


def records(run_dir: Path) -> dict[str, list]:
    """Every history row of the offline W&B runs under ``run_dir``, per run id (a resumed run writes a second
    offline-run directory with the same id, which ``wandb sync`` uploads into the same run)."""
    from wandb.proto import wandb_internal_pb2

    out: dict[str, list] = {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        rows = out.setdefault(path.stem.removeprefix("run-"), [])
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return out


def settled(run_dir: Path, step: int, runs: int) -> dict[str, list]:
    """``records`` once W&B's service has written ``runs`` offline runs up to ``step`` (it writes the file
    asynchronously, after ``finish`` returns)."""
    deadline = time.monotonic() + 60
    while True:
        got = records(run_dir)
        done = sum(any(r.get("_step") == step and "validation/grid/_type" in r for r in rows) for rows in got.values())
        if done >= 1 and len(list((run_dir / "wandb").glob("offline-run-*"))) >= runs or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def log_steps(run_dir: Path, steps, *, resume_step: int = 0) -> None:
    writer = MetricsWriter(run_dir, tensorboard=False, resume_step=resume_step, wandb=OFFLINE, config={"lr": 1e-4})
    for step in steps:
        writer.write(step, {"loss": 1.0 / step, "lr": 1e-4})
    writer.add_images(steps[-1], {"validation/grid": np.full((8, 12, 3), 200, np.uint8)})
    writer.close()


def test_scalars_and_images_reach_an_offline_run_and_a_resumed_run_keeps_its_id(tmp_path):
    run = tmp_path / "run"
    log_steps(run, [1, 2, 3])
    run_id = (run / ID_FILE).read_text().strip()
    got = settled(run, 3, runs=1)
    assert list(got) == [run_id]
    rows = got[run_id]
    losses = {r["_step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert losses == {1: 1.0, 2: 0.5, 3: pytest.approx(1 / 3)}
    (image,) = [r for r in rows if "validation/grid/_type" in r]  # W&B stores an image's fields flattened
    assert image["_step"] == 3 and image["validation/grid/_type"] == "image-file"
    assert (image["validation/grid/width"], image["validation/grid/height"]) == (12, 8)
    (png,) = run.glob("wandb/offline-run-*/files/" + image["validation/grid/path"])
    assert (np.asarray(Image.open(png)) == 200).all()

    log_steps(run, [3, 4, 5], resume_step=2)  # preempted after checkpoint 2: steps 3.. are trained again
    assert (run / ID_FILE).read_text().strip() == run_id
    resumed = settled(run, 5, runs=2)
    assert list(resumed) == [run_id]  # the second process wrote into the same run id
    steps = sorted(r["_step"] for r in resumed[run_id] if "train/loss" in r)
    assert steps[-3:] == [3, 4, 5]


def test_wandb_is_off_by_default_and_parses_from_yaml_and_overrides(tmp_path):
    assert load_config(ROOT / "configs" / "tiny.yaml").log.wandb.project == ""
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml", ["log.wandb.project=flux", "log.wandb.mode=offline", "log.wandb.name=x"]
    )
    assert cfg.log.wandb == WandbConfig(project="flux", mode="offline", name="x")
    assert from_dict({"log": {"wandb": {"project": "p", "entity": "team"}}}).log.wandb.entity == "team"
    with pytest.raises(ConfigError, match="mode"):
        load_config(ROOT / "configs" / "tiny.yaml", ["log.wandb.mode=sometimes"])
    with pytest.raises(ConfigError, match="colour"):
        from_dict({"log": {"wandb": {"colour": "blue"}}})
    writer = MetricsWriter(tmp_path / "off", tensorboard=False, wandb=WandbConfig())
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "off" / ID_FILE).exists() and not (tmp_path / "off" / "wandb").exists()


def test_without_the_package_it_is_one_config_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError, match=r"pip install 'flux-jax\[wandb\]'"):
        MetricsWriter(tmp_path / "run", tensorboard=False, wandb=OFFLINE)
