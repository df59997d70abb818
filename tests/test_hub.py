"""Hugging Face Hub names for checkpoint paths (`flux_jax.hub`): the spellings, resolution from a hand-built HF
cache with HF_HUB_OFFLINE=1, downloads from a local stand-in for the Hub (tests/helpers/hub_server.py), and the
places that accept a checkpoint path (convert, sample --base / --encoders, validation.base, encoders.*, model.base).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest

from flux_jax import cli, hub
from flux_jax.errors import CheckpointError
from flux_jax.hub import HubName
from flux_jax.weights.checkpoint import open_checkpoint
from flux_jax.weights.writers import write_flux_diffusers
from tests.helpers.hub_server import FakeHub, commit_of, read_tree, write_cached_repo
from tests.helpers.tiny_pipeline import TINY, build_tiny_pipeline, write_tiny_transformer_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIG = b"\0" * 65536  # stands in for FLUX.1-dev's 20+ GB root files (flux1-dev.safetensors, ae.safetensors)


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """The fake repositories' files: a FLUX.1 pipeline, a sharded transformer-only repo (Dev2Pro's layout), a
    one-file repo, one with several root files, and a gated pipeline."""
    root = tmp_path_factory.mktemp("repos")
    pipe = read_tree(build_tiny_pipeline(root / "pipe"))
    pipe.pop("demo.json")
    pipe.update({"flux1-dev.safetensors": BIG, "ae.safetensors": BIG, "README.md": b"# FLUX.1 tiny\n"})
    with open_checkpoint(root / "pipe" / "transformer") as ckpt:
        write_flux_diffusers(ckpt, root / "dev2pro", max_shard_bytes=800_000)
    dev2pro = read_tree(root / "dev2pro")
    assert sum(f.endswith(".safetensors") for f in dev2pro) > 1 and any(f.endswith(".index.json") for f in dev2pro)
    dev2pro.update({"README.md": b"# Dev2Pro tiny\n", "pytorch_model.bin": BIG})  # a pickle is never fetched
    single = write_tiny_transformer_file(root / "single.safetensors").read_bytes()
    return {
        "acme/pipe": pipe,
        "acme/dev2pro": dev2pro,
        "acme/single": {"weights/flux-tiny.safetensors": single, "flux-tiny.safetensors": single, "README.md": b"#"},
        "acme/files": {"a.safetensors": single, "b.safetensors": single},
        "acme/gated": pipe,
    }


@dataclasses.dataclass
class HF:
    cache: pathlib.Path
    monkeypatch: pytest.MonkeyPatch

    def offline(self) -> None:
        from huggingface_hub import constants

        self.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        self.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        hub.forget()

    def endpoint(self, url: str) -> None:
        # huggingface_hub reads HF_ENDPOINT when it is imported; in this process set its constants as well.
        from huggingface_hub import constants

        self.monkeypatch.setenv("HF_ENDPOINT", url)
        self.monkeypatch.setattr(constants, "ENDPOINT", url)
        self.monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        hub.forget()

    def snapshot(self, repo_id: str, revision: str = "main") -> pathlib.Path:
        return self.cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit_of(repo_id, revision)

    def cache_repo(self, repo_id: str, files: dict[str, bytes], refs=("main",)) -> pathlib.Path:
        return write_cached_repo(self.cache, repo_id, files, commit=commit_of(repo_id, refs[0]), refs=refs)


@pytest.fixture
def hf(monkeypatch, tmp_path):
    """A fresh, empty HF cache in tmp_path, no token anywhere, online against nothing (see `offline` / `endpoint`)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    hub.forget()
    yield HF(cache, monkeypatch)
    hub.forget()


@pytest.fixture
def cached(hf, repos) -> HF:
    """Offline, with acme/dev2pro (main and tag v1), acme/pipe and acme/single in the cache."""
    hf.cache_repo("acme/dev2pro", repos["acme/dev2pro"], refs=("main", "v1"))
    hf.cache_repo("acme/pipe", repos["acme/pipe"])
    hf.cache_repo("acme/single", repos["acme/single"])
    hf.offline()
    return hf


@pytest.fixture(scope="module")
def server(repos):
    with FakeHub() as fake:
        for repo_id, files in repos.items():
            fake.add(repo_id, files, revisions=("main", "v1"), gated=repo_id == "acme/gated")
        yield fake


@pytest.fixture
def online(hf, server) -> FakeHub:
    hf.endpoint(server.url)
    server.requests.clear()
    server.drop_once.clear()
    return server


def error(fn, *args) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------- spellings


@pytest.mark.parametrize(
    "spec, name",
    [
        ("acme/flux", HubName("acme/flux", None, "")),
        ("acme/flux@v1.0", HubName("acme/flux", "v1.0", "")),
        ("acme/flux/dir/file.safetensors", HubName("acme/flux", None, "dir/file.safetensors")),
        ("acme/flux@" + "a" * 40 + "/f.safetensors", HubName("acme/flux", "a" * 40, "f.safetensors")),
        ("acme/flux@refs/pr/3/transformer", HubName("acme/flux", "refs/pr/3", "transformer")),
    ],
)
def test_hub_spellings(spec, name):
    assert hub.parse(spec) == name


@pytest.mark.parametrize(
    "spec",
    ["/models/acme/flux", "./acme/flux", "../acme/flux", "~/acme/flux", "gs://bucket/run", "flux", "acme//flux",
     "acme/fl--ux", "acme/flux@", "acme/../flux", "C:\\models\\flux"],
)  # fmt: skip
def test_paths_that_are_never_hub_names(spec):
    assert hub.parse(spec) is None
    assert hub.resolve_transformer(spec) == spec  # returned as it is: the caller's own "no such file" error follows
    assert hub.resolve_transformer(pathlib.Path("acme/flux")) == "acme/flux"  # a Path is always a path


def test_the_encoder_folders_are_the_pipeline_layout():
    from flux_jax.data.encoding import ROOT_LAYOUT

    assert sorted(ROOT_LAYOUT.values()) == sorted(hub.ENCODER_FOLDERS)


# ---------------------------------------------------------------------------------------------------- offline cache


def test_offline_cache_resolves_names_revisions_and_single_files(cached, server):
    cached.endpoint(server.url)  # a Hub to ask, which must not be asked
    server.requests.clear()
    cached.offline()
    dev2pro, commit = cached.snapshot("acme/dev2pro"), commit_of("acme/dev2pro", "main")
    assert hub.resolve_transformer("acme/dev2pro") == str(dev2pro)
    assert hub.resolve_transformer(f"acme/dev2pro@{commit}") == str(dev2pro)  # a commit hash
    assert hub.resolve_transformer("acme/dev2pro@v1") == str(dev2pro)  # a tag in refs/
    single = cached.snapshot("acme/single") / "weights" / "flux-tiny.safetensors"
    assert hub.resolve_transformer("acme/single/weights/flux-tiny.safetensors") == str(single)
    assert hub.resolve_transformer("acme/single") == str(cached.snapshot("acme/single") / "flux-tiny.safetensors")
    assert hub.resolve_transformer("acme/pipe") == str(cached.snapshot("acme/pipe") / "transformer")
    assert hub.resolve_encoders("acme/pipe") == str(cached.snapshot("acme/pipe"))
    for spec in ("acme/dev2pro@v1", f"acme/dev2pro@{commit}", "acme/single/weights/flux-tiny.safetensors", "acme/pipe"):
        with open_checkpoint(spec) as ckpt:  # open_checkpoint takes the names itself
            assert ckpt.config == TINY, spec
    assert server.requests == []


def test_offline_misses_are_one_line_naming_them(cached):
    cache = cached.cache
    assert error(hub.resolve_transformer, "acme/missing") == (
        f"acme/missing: no such local path, and acme/missing is not in the Hugging Face cache ({cache}); {hub._OFFLINE}"
    )
    message = error(hub.resolve_transformer, "acme/dev2pro@v9")
    assert message.startswith(
        f"acme/dev2pro@v9: revision 'v9' of acme/dev2pro is not in the Hugging Face cache ({cache}"
    )
    assert f"cached: main, v1, {commit_of('acme/dev2pro', 'main')[:12]}" in message and "HF_HUB_OFFLINE=1" in message
    assert error(hub.resolve_transformer, "acme/single/nope.safetensors").startswith(
        "acme/single/nope.safetensors: no file or folder 'nope.safetensors' in acme/single at revision main as "
        "cached (its top level: README.md, flux-tiny.safetensors, weights/)"
    )
    assert error(hub.resolve_encoders, "acme/dev2pro") == (
        "acme/dev2pro: not a FLUX.1 pipeline repository: no vae/, text_encoder/, text_encoder_2/, tokenizer/, "
        "tokenizer_2/"
    )


def test_convert_of_a_missing_name_is_exit_2_and_one_line(cached, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    assert cli.main(["convert", "acme/missing", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flux-jax convert: error: acme/missing: no such local path") and "\n" not in err, err
    assert not out.exists()


def test_a_local_directory_named_like_a_repo_wins(cached, repos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "acme" / "dev2pro"
    local.mkdir(parents=True)
    for name, data in repos["acme/dev2pro"].items():
        (local / name).write_bytes(data)
    assert hub.resolve_transformer("acme/dev2pro") == "acme/dev2pro"
    with open_checkpoint("acme/dev2pro") as ckpt:
        assert ckpt.path.resolve() == local
    # "./" is never a Hub name: a missing one keeps the plain error.
    assert error(open_checkpoint, "./acme/nothing") == "acme/nothing: no such file or directory"


# ---------------------------------------------------------------------------------------------------- downloads


def test_downloads_fetch_only_the_needed_files(online, hf, repos):
    pipe = repos["acme/pipe"]
    transformer = hub.resolve_transformer("acme/pipe")
    assert transformer == str(hf.snapshot("acme/pipe") / "transformer")
    assert sorted(online.downloads("acme/pipe")) == sorted(f for f in pipe if f.startswith("transformer/"))
    root = hub.resolve_encoders("acme/pipe")
    encoders = [f for f in pipe if f.split("/")[0] in hub.ENCODER_FOLDERS] + ["model_index.json"]
    assert sorted(online.downloads("acme/pipe")) == sorted([*(f for f in pipe if f.startswith("transformer/")),
                                                            *encoders])  # fmt: skip
    assert hub.resolve_pipeline("acme/pipe") == root  # everything cached: nothing fetched twice
    fetched = online.downloads("acme/pipe")
    assert len(fetched) == len(set(fetched))
    for never in ("flux1-dev.safetensors", "ae.safetensors", "README.md", "scheduler/scheduler_config.json"):
        assert never not in fetched
    for name in fetched:
        assert (pathlib.Path(root) / name).read_bytes() == pipe[name], name
    with open_checkpoint(transformer) as ckpt:
        assert ckpt.config == TINY

    hub.resolve_transformer("acme/dev2pro@v1")
    wanted = [f for f in repos["acme/dev2pro"] if f.startswith("diffusion_pytorch_model") or f == "config.json"]
    assert sorted(online.downloads("acme/dev2pro")) == sorted(wanted)  # no README.md, no pytorch_model.bin

    # Offline afterwards: the same answers from the cache, with no request at all.
    online.requests.clear()
    hf.offline()
    assert hub.resolve_transformer("acme/pipe") == transformer and hub.resolve_pipeline("acme/pipe") == root
    assert hub.resolve_transformer("acme/dev2pro@v1") == str(hf.snapshot("acme/dev2pro", "v1"))
    assert online.requests == []


def test_a_gated_repo_says_how_to_get_access(online, hf, monkeypatch):
    page = f"{online.url}/acme/gated"
    assert error(hub.resolve_transformer, "acme/gated") == (
        f"acme/gated: acme/gated is a gated repository: accept the license at {page} and set HF_TOKEN or run "
        "`hf auth login`"
    )
    monkeypatch.setenv("HF_TOKEN", "hf_not_granted")
    hub.forget()
    assert error(hub.resolve_transformer, "acme/gated") == (
        f"acme/gated: acme/gated is a gated repository and the token in use has no access to it: accept the "
        f"license at {page} with that account, or set HF_TOKEN to a token of one that has"
    )
    assert online.requests[-1].authorization  # HF_TOKEN was sent


def test_an_interrupted_download_resumes_with_a_range_request(online, hf, repos, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub writes 10 MB chunks; with 64 KiB ones the first half of this 800 kB shard reaches the disk
    # before the connection drops, as the first gigabytes of a real shard would.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 65536)
    files = repos["acme/dev2pro"]
    shard = sorted(f for f in files if f.endswith(".safetensors"))[0]
    online.drop_once.add(("acme/dev2pro", shard))
    root = pathlib.Path(hub.resolve_transformer("acme/dev2pro"))
    assert (root / shard).read_bytes() == files[shard]
    gets = [r for r in online.requests if r.method == "GET" and r.path.endswith("/" + shard)]
    assert len(gets) == 2 and gets[0].range is None, gets
    resumed_at = int(gets[1].range.removeprefix("bytes=").removesuffix("-"))  # only the rest was asked for
    assert 0 < resumed_at <= len(files[shard]) // 2
    with open_checkpoint(root) as ckpt:
        assert ckpt.config == TINY


def test_missing_repo_revision_and_file_on_the_hub(online):
    assert error(hub.resolve_transformer, "acme/nope") == (
        f"acme/nope: no such local path, and no repository acme/nope on the Hugging Face Hub ({online.url}; a "
        "private one needs HF_TOKEN or `hf auth login`)"
    )
    assert error(hub.resolve_transformer, "acme/dev2pro@v9") == (
        "acme/dev2pro@v9: no revision 'v9' (branch, tag or commit hash) in acme/dev2pro on the Hugging Face Hub"
    )
    assert error(hub.resolve_transformer, "acme/single/nope.safetensors") == (
        "acme/single/nope.safetensors: no file or folder 'nope.safetensors' in acme/single at revision main (its "
        "top level: README.md, flux-tiny.safetensors, weights/)"
    )
    assert error(hub.resolve_transformer, "acme/files") == (
        "acme/files: no Flux transformer in the repository (no transformer/, no config.json with "
        "diffusion_pytorch_model*.safetensors, 2 .safetensors files at its root: name one, e.g. "
        "acme/files/a.safetensors)"
    )
    assert online.downloads("acme/files") == []  # refused from the listing, before any download


def test_an_unreachable_hub_falls_back_to_a_complete_cached_copy(hf, repos):
    hf.endpoint("http://127.0.0.1:9")  # nothing listens there
    message = error(hub.resolve_transformer, "acme/dev2pro")
    assert message.startswith("acme/dev2pro: no such local path, and acme/dev2pro is not in the Hugging Face cache")
    assert "the Hugging Face Hub at http://127.0.0.1:9 cannot be reached" in message
    hf.cache_repo("acme/dev2pro", repos["acme/dev2pro"])
    assert hub.resolve_transformer("acme/dev2pro") == str(hf.snapshot("acme/dev2pro"))


def test_convert_downloads_a_name_through_the_real_entry_point(server, tmp_path):
    """`flux-jax convert org/name@rev out.safetensors` in a fresh process: HF_ENDPOINT and HF_HUB_CACHE from the
    environment, as a user sets them."""
    out = tmp_path / "out.safetensors"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=server.url, HF_HUB_CACHE=str(tmp_path / "cache"), HF_TOKEN_PATH=str(tmp_path / "t"),
               PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")  # fmt: skip
    argv = [sys.executable, "-m", "flux_jax.cli", "convert", "acme/dev2pro@v1", str(out), "--layout", "bfl"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Fetching" in done.stderr  # huggingface_hub's own progress bar, on stderr
    with open_checkpoint(out) as ckpt:
        assert ckpt.config == TINY and ckpt.layout == "bfl"


# ---------------------------------------------------------------------------------------------------- the callers


def test_sample_base_and_encoders_take_names(cached, online):
    from flux_jax.sampling.loading import resolve_base

    cached.offline()
    pipe, dev2pro = cached.snapshot("acme/pipe"), cached.snapshot("acme/dev2pro")
    base = resolve_base("acme/pipe")
    assert base.transformer == str(pipe / "transformer") and base.encoders.vae == pipe / "vae"
    assert base.encoders.t5_tokenizer == pipe / "tokenizer_2"
    base = resolve_base("acme/dev2pro@v1", "acme/pipe")
    assert base.transformer == str(dev2pro) and base.encoders.clip == pipe / "text_encoder"
    assert error(resolve_base, "acme/dev2pro").startswith("acme/dev2pro: a transformer checkpoint without its encoders")


def test_sample_refuses_a_transformer_repo_alone_before_downloading(online, tmp_path, capsys):
    argv = ["sample", "--base", "acme/dev2pro", "--prompt", "a cat", "--width", "32", "--height", "32",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flux-jax sample: error: acme/dev2pro: a transformer checkpoint without its encoders"), err
    assert online.downloads("acme/dev2pro") == [] and not (tmp_path / "out").exists()


def test_validation_base_takes_a_name(cached):
    from flux_jax.train.validation import open_base

    assert open_base("acme/pipe") == (str(cached.snapshot("acme/pipe") / "transformer"), TINY)
    assert error(open_base, "acme/missing").startswith("validation.base: acme/missing: no such local path")


def test_encoders_root_and_each_encoder_take_names(cached, tmp_path):
    from flux_jax.data.encoding import resolve_encoder_paths
    from flux_jax.run_config import load_config

    pipe = cached.snapshot("acme/pipe")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["encoders.root=acme/pipe"])
    paths, stamp = resolve_encoder_paths(cfg, tmp_path / "demo")
    assert stamp is None and paths.vae == pipe / "vae" and paths.t5 == pipe / "text_encoder_2"
    each = ["encoders.vae=acme/pipe/vae", "encoders.t5=acme/pipe", "encoders.clip=acme/pipe",
            "encoders.t5_tokenizer=acme/pipe/tokenizer_2", "encoders.clip_tokenizer=acme/pipe"]  # fmt: skip
    paths, _ = resolve_encoder_paths(load_config(ROOT / "configs" / "tiny.yaml", each), tmp_path / "demo")
    assert (paths.vae, paths.t5, paths.clip) == (pipe / "vae", pipe / "text_encoder_2", pipe / "text_encoder")
    assert (paths.t5_tokenizer, paths.clip_tokenizer) == (pipe / "tokenizer_2", pipe / "tokenizer")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["encoders.root=acme/dev2pro"])
    assert error(resolve_encoder_paths, cfg, tmp_path / "demo").startswith(
        "encoders.root: acme/dev2pro: not a FLUX.1 pipeline repository: no vae/"
    )


def test_model_base_takes_a_name(cached, online):
    import jax.numpy as jnp

    from flux_jax.planning.fit import resolve_model
    from flux_jax.run_config import load_config
    from flux_jax.weights.load import load_flux

    cached.offline()
    model = load_flux("acme/dev2pro@v1", dtype=jnp.float32)  # what the trainer calls with model.base
    assert model.config == TINY
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.base=acme/dev2pro", "model.preset=null"])
    assert resolve_model(cfg) == (TINY, "acme/dev2pro", ())
    # The planner never downloads: a name not in the cache is planned as Flux.1-dev, with a note, and no request.
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.base=acme/elsewhere", "model.preset=null"])
    assert "'acme/elsewhere' is not on this machine" in resolve_model(cfg)[2][0]
    assert online.requests == []


def test_export_merge_into_takes_a_name(cached, tmp_path, capsys):
    import numpy as np

    from flux_jax.lora_io.export import write_lora_file
    from flux_jax.lora_io.weights import LoraWeights
    from flux_jax.weights import flux_keys
    from flux_jax.weights.sources import read_all

    module = "double_blocks.0.img_attn.qkv"
    out_dim, in_dim = flux_keys.bfl_shapes(TINY)[module + ".weight"]
    rng = np.random.default_rng(0)
    lora = LoraWeights(rng.standard_normal((2, in_dim)), rng.standard_normal((out_dim, 2)), alpha=2.0)
    path = write_lora_file(tmp_path / "lora.safetensors", {module: lora}, "kohya", config=TINY, dtype="fp32")
    out = tmp_path / "merged.safetensors"
    assert cli.main(["export", str(path), str(out), "--merge-into", "acme/dev2pro@v1"]) == 0, capsys.readouterr().err
    with open_checkpoint("acme/dev2pro@v1") as base, open_checkpoint(out) as merged:
        want = read_all(base.tensors[module + ".weight"]) + lora.up @ lora.down  # alpha / rank = 1
        np.testing.assert_allclose(read_all(merged.tensors[module + ".weight"]), want, rtol=1e-6, atol=1e-6)
