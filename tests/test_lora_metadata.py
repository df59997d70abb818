"""LoRA files get shared: an exported file names no local path by default (the base, the data and the run by their
names only, no full run config), and `--metadata full` keeps everything. A real run directory with a base
checkpoint and a dataset on local paths, exported through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest

from flux_jax import cli
from flux_jax.data.examples import synthetic_examples, write_cached_examples
from flux_jax.lora_io.formats import FORMATS
from flux_jax.run_config import load_config
from flux_jax.train.checkpointing import read_lora_weights
from flux_jax.train.loop import setup
from flux_jax.weights.safetensors_file import SafetensorsFile
from tests.helpers.compile_cache import persistent_compile_cache
from tests.helpers.torch_reference import diffusers_flux, tiny_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run whose base, data and output_dir are absolute local paths; its checkpoint at step 0."""
    home = tmp_path_factory.mktemp("home_of_me")
    model_cfg = tiny_config()
    diffusers_flux(model_cfg, seed=3).save_pretrained(home / "my_base")
    synthetic = synthetic_examples(
        in_channels=model_cfg.in_channels, context_dim=model_cfg.context_in_dim, vec_dim=model_cfg.vec_in_dim,
        resolution=64,
    )  # fmt: skip
    data = write_cached_examples(home / "my_photos", [synthetic.read(i) for i in range(len(synthetic))])
    run_dir = home / "runs" / "my_lora"
    cfg = load_config(TINY, [
        f"output_dir={run_dir}", "log.tensorboard=false", "checkpoint.async_save=false", "model.preset=null",
        f"model.base={home / 'my_base'}", "mesh.data=1", "data.synthetic=false", f"data.path={data}",
    ])  # fmt: skip
    with persistent_compile_cache(tmp_path_factory.getbasetemp() / "train-xla-cache"):
        trainer, state = setup(cfg, devices=jax.devices()[:1], progress=False)
        trainer.checkpointer.save(state, data_state=trainer.data.get_state(), meta=trainer.meta)
        trainer.checkpointer.wait()
    _, meta = read_lora_weights(run_dir)
    # What the run itself keeps (and what a shared file must not): the paths of this machine.
    assert meta["base"] == str(home / "my_base") and str(data) in meta["dataset"]
    assert meta["config"]["output_dir"] == str(run_dir) and meta["config"]["data"]["path"] == str(data)
    return dict(home=home, run=run_dir, data=data, base=home / "my_base")


def strings(value):
    """Every string in a metadata value, and in the JSON it holds."""
    yield value
    try:
        parsed = json.loads(value)
    except ValueError:
        return
    stack = [parsed]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            stack += [*x.keys(), *x.values()]
        elif isinstance(x, list):
            stack += x


def metadata(path) -> dict[str, str]:
    with SafetensorsFile(path) as f:
        return dict(f.metadata)


def assert_no_local_path(md: dict[str, str], home: Path) -> None:
    for key, value in md.items():
        for s in strings(value):
            assert str(home) not in s and home.name not in s, (key, s)
            assert not s.startswith("/"), (key, s)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_exported_file_names_no_local_path_by_default(run, tmp_path, fmt):
    out = tmp_path / f"{fmt}.safetensors"
    assert cli.main(["export", str(run["run"]), str(out), "--format", fmt]) == 0
    md = metadata(out)
    assert_no_local_path(md, run["home"])
    meta = json.loads(md["flux_jax.meta"])
    assert "config" not in meta
    assert meta["base"] == "my_base" and "my_photos" in meta["dataset"]
    assert (meta["rank"], meta["alpha"], meta["step"]) == (4, 8.0, 0)  # the summary stays
    if fmt == "kohya":
        assert md["ss_sd_model_name"] == "my_base" and "my_photos" in md["ss_dataset"]

    # Converting the file again keeps it path-free.
    again = tmp_path / f"{fmt}-again.safetensors"
    assert cli.main(["export", str(out), str(again), "--format", "kohya"]) == 0
    assert_no_local_path(metadata(again), run["home"])


def test_metadata_full_keeps_everything(run, tmp_path, capsys):
    out = tmp_path / "full.safetensors"
    assert cli.main(["export", str(run["run"]), str(out), "--format", "kohya", "--metadata", "full"]) == 0
    md = metadata(out)
    meta = json.loads(md["flux_jax.meta"])
    assert meta["base"] == str(run["base"]) and md["ss_sd_model_name"] == str(run["base"])
    assert str(run["data"]) in meta["dataset"]
    assert meta["config"]["output_dir"] == str(run["run"]) and meta["config"]["data"]["path"] == str(run["data"])

    # A conversion of a full file is public unless asked otherwise ...
    public = tmp_path / "public.safetensors"
    assert cli.main(["export", str(out), str(public), "--format", "diffusers"]) == 0
    assert_no_local_path(metadata(public), run["home"])
    kept = tmp_path / "kept.safetensors"
    assert cli.main(["export", str(out), str(kept), "--format", "diffusers", "--metadata", "full"]) == 0
    assert json.loads(metadata(kept)["flux_jax.meta"])["config"] == meta["config"]

    merged = tmp_path / "merged.safetensors"
    argv = ["export", str(run["run"]), str(merged), "--merge-into", str(run["base"]), "--metadata", "full"]
    assert cli.main(argv) == 2
    assert "--metadata does not apply to --merge-into" in capsys.readouterr().err
    assert not merged.exists()


def test_a_hub_base_is_named_whole_and_a_local_one_by_its_file_name(tmp_path):
    from flux_jax.lora_io.export import public_meta

    assert public_meta({"base": "ashen0209/Flux-Dev2Pro"})["base"] == "ashen0209/Flux-Dev2Pro"
    assert public_meta({"base": "Kijai/flux-dev2pro-fp8@main/x.safetensors"})["base"].startswith("Kijai/")
    assert public_meta({"base": "/home/me/models/dev2pro.safetensors"})["base"] == "dev2pro.safetensors"
    local = tmp_path / "acme" / "dev2pro"
    local.mkdir(parents=True)
    assert public_meta({"base": str(local)})["base"] == "dev2pro"
