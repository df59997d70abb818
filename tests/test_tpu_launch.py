"""TPU launcher: exact gcloud command lines, the remote bash scripts run for real, and the mesh configs."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import jax
import pytest

from flux_jax import tpu_launch
from flux_jax.axes import resolve_mesh_shape
from flux_jax.errors import ConfigError
from flux_jax.hardware import GENERATIONS, parse_slice
from flux_jax.run_config import load_config, parse_override
from flux_jax.sharding import make_mesh
from flux_jax.tpu_launch import (
    Target,
    TpuLaunchError,
    launch_script,
    main,
    mesh_overrides,
    stop_script,
)

ROOT = Path(__file__).resolve().parents[1]
MESH_DIR = ROOT / "configs" / "mesh"
MESH_YAMLS = sorted(MESH_DIR.glob("*.yaml"))


def dry_run(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    assert main([*argv, "--dry-run"]) == 0
    return capsys.readouterr().out.splitlines()


def remote_script(line: str) -> str:
    """The bash a printed `gcloud ... ssh --command=...` line sends to the workers."""
    (command,) = [arg for arg in shlex.split(line) if arg.startswith("--command=")]
    return command.removeprefix("--command=")


# --------------------------------------------------------------------------------------------------
# Slices


@pytest.mark.parametrize(
    ("text", "name", "chips", "hosts", "accelerator", "runtime", "topology", "hbm"),
    [
        ("v4-8", "v4-8", 4, 1, "v4-8", "tpu-ubuntu2204-base", "v4:2x2x1", 32),
        ("v4-16", "v4-16", 8, 2, "v4-16", "tpu-ubuntu2204-base", "v4:2x2x2", 32),
        ("v5e-4", "v5e-4", 4, 1, "v5litepod-4", "v2-alpha-tpuv5-lite", "v5e:2x2", 16),
        ("v5e-8", "v5e-8", 8, 1, "v5litepod-8", "v2-alpha-tpuv5-lite", "v5e:2x4", 16),
        ("v5litepod-16", "v5e-16", 16, 4, "v5litepod-16", "v2-alpha-tpuv5-lite", "v5e:4x4", 16),
        ("v5e-32", "v5e-32", 32, 8, "v5litepod-32", "v2-alpha-tpuv5-lite", "v5e:4x8", 16),
        ("V5E-256", "v5e-256", 256, 64, "v5litepod-256", "v2-alpha-tpuv5-lite", "v5e:16x16", 16),
        ("v5p-8", "v5p-8", 4, 1, "v5p-8", "v2-alpha-tpuv5", "v5p:2x2x1", 95),
        ("v5p-16", "v5p-16", 8, 2, "v5p-16", "v2-alpha-tpuv5", "v5p:2x2x2", 95),
        ("v5p-32", "v5p-32", 16, 4, "v5p-32", "v2-alpha-tpuv5", "v5p:2x2x4", 95),
        ("v5p-64", "v5p-64", 32, 8, "v5p-64", "v2-alpha-tpuv5", "v5p:2x4x4", 95),
        ("v5p-128", "v5p-128", 64, 16, "v5p-128", "v2-alpha-tpuv5", "v5p:4x4x4", 95),
        ("v6e-8", "v6e-8", 8, 1, "v6e-8", "v2-alpha-tpuv6e", "v6e:2x4", 32),
        ("v6e-16", "v6e-16", 16, 4, "v6e-16", "v2-alpha-tpuv6e", "v6e:4x4", 32),
        ("v6e-256", "v6e-256", 256, 64, "v6e-256", "v2-alpha-tpuv6e", "v6e:16x16", 32),
    ],
)
def test_parse_slice(
    text: str, name: str, chips: int, hosts: int, accelerator: str, runtime: str, topology: str, hbm: int
) -> None:
    s = parse_slice(text)
    assert (s.name, s.chips, s.hosts, s.accelerator_type) == (name, chips, hosts, accelerator)
    assert (s.generation.runtime_version, s.topology, s.generation.hbm_gib) == (runtime, topology, hbm)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("v5e", "not of the form"),
        ("v7x-8", "unknown TPU generation 'v7x'"),
        ("v5e-2", "power-of-two chip count from 1 to 256"),
        ("v5e-12", "power-of-two"),
        ("v5e-512", "power-of-two"),
        ("v5p-4", r"from 4 to 4096 \(the name counts TensorCores, 2 per chip\)"),
        ("v4-9", "TensorCores"),
    ],
)
def test_parse_slice_errors(text: str, match: str) -> None:
    with pytest.raises(TpuLaunchError, match=match):
        parse_slice(text)


def test_bad_tpu_name() -> None:
    with pytest.raises(TpuLaunchError, match="lowercase letters"):
        Target("My_TPU")


# --------------------------------------------------------------------------------------------------
# create / delete / status / ssh / logs: exact command lines


def test_create_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert dry_run(capsys, "create", "--name", "flux-a", "--zone", "us-west4-a", "--slice", "v5e-8") == [
        "gcloud compute tpus tpu-vm create flux-a --zone=us-west4-a --accelerator-type=v5litepod-8 "
        "--version=v2-alpha-tpuv5-lite"
    ]
    assert dry_run(
        capsys,
        "create",
        "--name",
        "flux-a",
        "--zone",
        "us-east5-b",
        "--project",
        "my-proj",
        "--slice",
        "v6e-8",
        "--spot",
    ) == [
        "gcloud compute tpus tpu-vm create flux-a --zone=us-east5-b --project=my-proj --accelerator-type=v6e-8 "
        "--version=v2-alpha-tpuv6e --spot"
    ]
    # No --zone / --project: gcloud's configured defaults apply, so none are passed.
    assert dry_run(capsys, "create", "--name", "flux-a", "--slice", "v4-8", "--version", "tpu-ubuntu2204-base") == [
        "gcloud compute tpus tpu-vm create flux-a --accelerator-type=v4-8 --version=tpu-ubuntu2204-base"
    ]


def test_create_queued_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    lines = dry_run(
        capsys,
        "create",
        "--name",
        "flux-p",
        "--zone",
        "us-east5-a",
        "--project",
        "p1",
        "--slice",
        "v5p-8",
        "--queued",
        "--spot",
    )
    assert lines == [
        "gcloud compute tpus queued-resources create flux-p --zone=us-east5-a --project=p1 --node-id=flux-p "
        "--accelerator-type=v5p-8 --runtime-version=v2-alpha-tpuv5 --spot"
    ]


def test_delete_status_ssh_logs_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    t = ("--name", "flux-a", "--zone", "z1")
    assert dry_run(capsys, "delete", *t) == ["gcloud compute tpus tpu-vm delete flux-a --zone=z1"]
    assert dry_run(capsys, "delete", *t, "--yes") == ["gcloud compute tpus tpu-vm delete flux-a --zone=z1 --quiet"]
    assert dry_run(capsys, "delete", *t, "--queued", "--yes") == [
        "gcloud compute tpus queued-resources delete flux-a --zone=z1 --force --quiet"
    ]
    assert dry_run(capsys, "status", *t) == ["gcloud compute tpus tpu-vm describe flux-a --zone=z1"]
    assert dry_run(capsys, "status", *t, "--queued") == [
        "gcloud compute tpus queued-resources describe flux-a --zone=z1"
    ]
    assert dry_run(capsys, "ssh", *t, "--command", "gcloud storage cp -r gs://b/ckpt ~/checkpoints/") == [
        "gcloud compute tpus tpu-vm ssh flux-a --zone=z1 --worker=all "
        "'--command=gcloud storage cp -r gs://b/ckpt ~/checkpoints/'"
    ]
    assert dry_run(capsys, "logs", *t) == [
        "gcloud compute tpus tpu-vm ssh flux-a --zone=z1 --worker=0 '--command=tail -n 100 -F ~/flux-jax-run/train.log'"
    ]
    assert dry_run(capsys, "logs", "cache", *t, "--worker", "all", "--lines", "20", "--no-follow") == [
        "gcloud compute tpus tpu-vm ssh flux-a --zone=z1 --worker=all '--command=tail -n 20 ~/flux-jax-run/cache.log'"
    ]


def test_stop_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    (line,) = dry_run(capsys, "stop", "--name", "flux-a", "--zone", "z1", "--timeout", "30")
    assert line.startswith("gcloud compute tpus tpu-vm ssh flux-a --zone=z1 --worker=all '--command=")
    assert remote_script(line) == stop_script("train", 30)
    assert 'kill -TERM -- "-$p"' in stop_script("train", 30)


# --------------------------------------------------------------------------------------------------
# install


def test_install_from_git_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    url = "git+https://github.com/example/flux-jax@v0.1.0"
    (line,) = dry_run(capsys, "install", "--name", "flux-a", "--zone", "z1", "--source", url)
    assert line.startswith(
        "gcloud compute tpus tpu-vm ssh flux-a --zone=z1 --worker=all '--command=set -euo pipefail; "
    )
    script = remote_script(line)
    assert script == (
        "set -euo pipefail; cd ~; mkdir -p flux-jax-run; python3 -m pip install --user --quiet --upgrade uv "
        "|| python3 -m pip install --user --quiet --upgrade --break-system-packages uv; "
        "test -x flux-jax-venv/bin/pip || { rm -rf flux-jax-venv && python3 -m uv venv --seed --python 3.11 "
        "flux-jax-venv; }; "
        "flux-jax-venv/bin/python -m pip install --quiet --upgrade pip; "
        "flux-jax-venv/bin/python -m pip install --upgrade "
        "'flux-jax[tpu] @ git+https://github.com/example/flux-jax@v0.1.0'; "
        "flux-jax-venv/bin/python -m pip install --quiet --force-reinstall --no-deps "
        "'flux-jax[tpu] @ git+https://github.com/example/flux-jax@v0.1.0'; "
        'echo "flux-jax installed on $(hostname): $(flux-jax-venv/bin/flux-jax --help > /dev/null && echo ok)"'
    )
    # The requirement reaches pip as one argument, spaces and brackets intact.
    pip_line = [part for part in script.split("; ") if "pip install --upgrade 'flux" in part][0]
    assert shlex.split(pip_line)[-1] == f"flux-jax[tpu] @ {url}"


def test_install_from_wheel_dry_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    wheel = tmp_path / "flux_jax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    lines = dry_run(capsys, "install", "--name", "flux-a", "--source", str(wheel), "--python", "3.12")
    assert lines[0] == f"gcloud compute tpus tpu-vm scp {wheel} flux-a:flux_jax-0.1.0-py3-none-any.whl --worker=all"
    script = remote_script(lines[1])
    assert "python3 -m uv venv --seed --python 3.12 flux-jax-venv; }" in script
    assert "flux-jax-venv/bin/python -m pip install --upgrade './flux_jax-0.1.0-py3-none-any.whl[tpu]'" in script
    assert len(lines) == 2


@pytest.mark.parametrize(
    ("source", "match"),
    [("dist/missing-0.1.0.whl", "does not exist"), ("flux-jax", "neither a URL")],
)
def test_install_bad_source(capsys: pytest.CaptureFixture[str], source: str, match: str) -> None:
    assert main(["install", "--name", "flux-a", "--source", source, "--dry-run"]) == 2
    assert match in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# launch


def test_launch_dry_run_exact(capsys: pytest.CaptureFixture[str]) -> None:
    lines = dry_run(capsys, "launch", "train", "--name", "flux-a", "--zone", "z1", "--config", "configs/tiny.yaml")
    assert (
        lines[0]
        == "gcloud compute tpus tpu-vm scp configs/tiny.yaml flux-a:flux-jax-run/train.yaml --zone=z1 --worker=all"
    )
    assert lines[1] == shlex.join(
        [
            "gcloud", "compute", "tpus", "tpu-vm", "ssh", "flux-a", "--zone=z1", "--worker=all",
            "--command=" + launch_script("train", []),
        ]
    )  # fmt: skip
    script = remote_script(lines[1])
    assert script == (
        "set -eu; cd ~; mkdir -p flux-jax-run; "
        'alive() { s=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${s#Z}" = "$s" ]; }; '
        'if [ -f flux-jax-run/train.pid ] && alive "$(cat flux-jax-run/train.pid)"; then echo "flux-jax train is '
        'already running on $(hostname) (pid $(cat flux-jax-run/train.pid)); stop it first" >&2; exit 1; fi; '
        'echo "=== flux-jax train launched $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname) ===" '
        ">> flux-jax-run/train.log; "
        "setsid nohup bash -c 'echo $$ > flux-jax-run/train.pid; exec env FLUX_JAX_DISTRIBUTED=1 "
        "flux-jax-venv/bin/flux-jax train --config flux-jax-run/train.yaml' >> flux-jax-run/train.log 2>&1 "
        "< /dev/null & "
        'echo "started flux-jax train on $(hostname); log: ~/flux-jax-run/train.log"'
    )


def test_launch_mesh_overrides_and_quoting(capsys: pytest.CaptureFixture[str]) -> None:
    tricky = "output_dir=gs://bucket/runs/it's a run"
    lines = dry_run(
        capsys,
        "launch",
        "cache",
        "--name",
        "flux-a",
        "--config",
        "configs/dev2pro_lora.yaml",
        "--mesh",
        "configs/mesh/v5e-8.yaml",
        "--env",
        "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true --x=1",
        "data.path=gs://bucket/data",
        tricky,
        "train.batch_size=16",
    )
    assert (
        lines[0]
        == "gcloud compute tpus tpu-vm scp configs/dev2pro_lora.yaml flux-a:flux-jax-run/cache.yaml --worker=all"
    )
    script = remote_script(lines[1])
    # Peel the two quoting layers: the outer script holds `bash -c INNER`, INNER holds the program argv.
    inner = shlex.split(re.search(r"setsid nohup bash -c (.*?) >> ", script)[1])
    assert inner == [
        "echo $$ > flux-jax-run/cache.pid; exec env FLUX_JAX_DISTRIBUTED=1 "
        "'LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true --x=1' flux-jax-venv/bin/flux-jax cache "
        "--config flux-jax-run/cache.yaml mesh.data=1 mesh.fsdp=8 "
        "mesh.tensor=1 train.batch_size=8 data.path=gs://bucket/data 'output_dir=gs://bucket/runs/it'\"'\"'s a run' "
        "train.batch_size=16"
    ]
    program = shlex.split(inner[0].split("; exec ", 1)[1])
    assert program == [
        "env",
        "FLUX_JAX_DISTRIBUTED=1",
        "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true --x=1",
        "flux-jax-venv/bin/flux-jax",
        "cache",
        "--config",
        "flux-jax-run/cache.yaml",
        "mesh.data=1",
        "mesh.fsdp=8",
        "mesh.tensor=1",
        "train.batch_size=8",
        "data.path=gs://bucket/data",
        tricky,
        "train.batch_size=16",
    ]


def test_launch_warns_about_a_worker_local_output_dir(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    base = ["launch", "train", "--name", "flux-a", "--config", "configs/tiny.yaml"]
    dry_run(capsys, *base)
    assert "output_dir 'runs/tiny' is local to each worker" in caplog.text
    caplog.clear()
    dry_run(capsys, *base, "output_dir=gs://bucket/runs/tiny")
    assert "local to each worker" not in caplog.text


def test_launch_validates_before_renting(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    base = ["launch", "train", "--name", "flux-a", "--config", "configs/tiny.yaml", "--dry-run"]
    assert main([*base, "train.stepz=3"]) == 2
    assert "unknown key 'train.stepz'" in capsys.readouterr().err
    bad_mesh = tmp_path / "bad.yaml"
    bad_mesh.write_text("mesh:\n  fsdp: -1\n  data: -1\n")
    assert main([*base, "--mesh", str(bad_mesh)]) == 2
    err = capsys.readouterr().err
    assert str(bad_mesh) in err and "at most one mesh axis may be -1" in err
    assert main([*base, "--env", "1BAD=x"]) == 2
    assert "--env '1BAD=x' is not of the form NAME=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--bogus"])
    with pytest.raises(SystemExit):
        main(["stop", "--name", "flux-a", "--dry-run", "a.b=1"])  # overrides belong to launch only


# --------------------------------------------------------------------------------------------------
# The remote scripts, executed: launch -> refuse a second launch -> stop (SIGTERM, checkpoint) -> not running


FAKE_FLUX_JAX = """#!/usr/bin/env bash
# Stands in for the trainer: records its argv and env, then runs until SIGTERM, which it answers the way
# the trainer does (save, exit 0).
printf '%s\\n' "$@" > "$HOME/argv.txt"
echo "LIBTPU_INIT_ARGS=${LIBTPU_INIT_ARGS:-} FLUX_JAX_DISTRIBUTED=${FLUX_JAX_DISTRIBUTED:-}" > "$HOME/env.txt"
trap 'echo "saved checkpoint on SIGTERM"; exit 0' TERM
echo "training"
while true; do sleep 0.05; done
"""


def _bash(script: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)


def _wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_remote_launch_and_stop_scripts_run(tmp_path: Path) -> None:
    home = tmp_path / "home"
    venv_bin = home / "flux-jax-venv" / "bin"
    venv_bin.mkdir(parents=True)
    fake = venv_bin / "flux-jax"
    fake.write_text(FAKE_FLUX_JAX)
    fake.chmod(0o755)
    overrides = ["mesh.fsdp=8", "output_dir=gs://b/it's a run", 'data.path=/d/"q" $HOME']
    launch = launch_script("train", overrides, ["LIBTPU_INIT_ARGS=--a=1 --b=2"])
    pid_file = home / "flux-jax-run" / "train.pid"
    log = home / "flux-jax-run" / "train.log"
    pid = None
    try:
        started = _bash(launch, home)
        assert started.returncode == 0, started.stderr
        assert "started flux-jax train on" in started.stdout
        _wait_for(lambda: (home / "env.txt").exists() and "training" in log.read_text(), "the fake trainer")
        pid = int(pid_file.read_text())
        # The recorded pid is the trainer itself (exec kept it) and leads its own process group.
        assert os.getpgid(pid) == pid
        assert (home / "argv.txt").read_text().splitlines() == [
            "train",
            "--config",
            "flux-jax-run/train.yaml",
            *overrides,
        ]
        assert (home / "env.txt").read_text() == "LIBTPU_INIT_ARGS=--a=1 --b=2 FLUX_JAX_DISTRIBUTED=1\n"
        assert log.read_text().startswith("=== flux-jax train launched ")

        again = _bash(launch, home)
        assert again.returncode == 1
        assert "flux-jax train is already running on" in again.stderr and f"(pid {pid})" in again.stderr

        stopped = _bash(stop_script("train", 20), home)
        assert stopped.returncode == 0, stopped.stderr
        assert "flux-jax train stopped on" in stopped.stdout
        assert "saved checkpoint on SIGTERM" in log.read_text()
        pid = None

        idle = _bash(stop_script("train", 20), home)
        assert idle.returncode == 0 and "flux-jax train is not running on" in idle.stdout
        # A finished run does not block the next launch (the pid file is stale, not alive).
        relaunched = _bash(launch, home)
        assert relaunched.returncode == 0, relaunched.stderr
        _wait_for(lambda: log.read_text().count("training") == 2, "the relaunched trainer")
        pid = int(pid_file.read_text())
        assert log.read_text().count("=== flux-jax train launched ") == 2  # the log is appended, not replaced
        assert _bash(stop_script("train", 20), home).returncode == 0
        pid = None
    finally:
        if pid is not None:  # only the fake trainer this test started
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --------------------------------------------------------------------------------------------------
# Execution through gcloud (a fake one on PATH)


def test_runs_commands_in_order_and_stops_at_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(
        f'#!/usr/bin/env bash\nprintf "%s|" "$@" >> {calls}\necho >> {calls}\n'
        f'[ "$4" = ssh ] && [ -f {tmp_path}/fail_ssh ] && exit 7\nexit 0\n'
    )
    gcloud.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    argv = ["launch", "train", "--name", "flux-a", "--config", "configs/tiny.yaml"]
    assert main(argv) == 0
    made = [line.rstrip("|").split("|") for line in calls.read_text().splitlines()]
    assert [m[2:4] for m in made] == [["tpu-vm", "scp"], ["tpu-vm", "ssh"]]
    assert made[1][-1] == "--command=" + launch_script("train")

    calls.unlink()
    (tmp_path / "fail_ssh").touch()
    assert main(argv) == 7
    assert len(calls.read_text().splitlines()) == 2
    assert "gcloud exited with status 7" in capsys.readouterr().err


def test_missing_gcloud_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(tpu_launch.shutil, "which", lambda name: None)
    assert main(["status", "--name", "flux-a"]) == 2
    assert "gcloud is not on PATH" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Mesh configs


def test_mesh_overrides_round_trip(tmp_path: Path) -> None:
    assert mesh_overrides(MESH_DIR / "v5e-8.yaml") == [
        "mesh.data=1",
        "mesh.fsdp=8",
        "mesh.tensor=1",
        "train.batch_size=8",
    ]
    path = tmp_path / "m.yaml"
    path.write_text(
        "mesh:\n  data: -1\n  rules: [[embed, fsdp], [act_batch, [data, fsdp]]]\nmodel:\n  preset: null\n"
        "  base: ''\noptim:\n  lr: 3.0e-4\n  clip_norm: null\nlora:\n  targets: ['a.*', b]\ncheckpoint:\n"
        "output_dir: gs://b/x y\n"
    )
    items = mesh_overrides(path)
    assert items == [
        "mesh.data=-1",
        "mesh.rules=[[embed, fsdp], [act_batch, [data, fsdp]]]",
        "model.preset=null",
        "model.base=",
        "optim.lr=0.0003",
        "optim.clip_norm=null",
        "lora.targets=[a.*, b]",
        "output_dir=gs://b/x y",
    ]
    # Applied as overrides, the file means exactly what loading it means.
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty, items) == load_config(path)
    assert [parse_override(item)[0] for item in items][:2] == ["mesh.data", "mesh.rules"]


def test_user_overrides_win_over_the_mesh_file() -> None:
    items = mesh_overrides(MESH_DIR / "v5e-4.yaml")
    cfg = load_config(ROOT / "configs" / "dev2pro_lora.yaml", [*items, "train.batch_size=8", "train.grad_accum=2"])
    assert cfg.mesh.shape == (1, 4, 1) and (cfg.train.batch_size, cfg.train.grad_accum) == (8, 2)


def test_mesh_overrides_reject_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("mesh:\n  fdsp: 8\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key 'mesh.fdsp' \(did you mean 'fsdp'\?\)"):
        mesh_overrides(path)


def test_mesh_overrides_reject_a_duplicate_key(tmp_path: Path) -> None:
    """A second `mesh:` section would silently replace the first: an error naming both lines (issue 16, case 7)."""
    path = tmp_path / "twice.yaml"
    path.write_text("mesh:\n  data: 1\n  fsdp: 8\ntrain:\n  batch_size: 8\nmesh:\n  fsdp: 4\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: duplicate key 'mesh' on line 6 \(first on line 1\)"):
        mesh_overrides(path)


def test_required_mesh_configs_exist() -> None:
    names = {p.stem for p in MESH_YAMLS}
    assert {"v4-8", "v5e-4", "v5e-8", "v5e-16", "v5p-8", "v6e-8", "v5e-256"} <= names


@pytest.mark.parametrize("path", MESH_YAMLS, ids=lambda p: p.stem)
def test_mesh_config_fits_its_slice(path: Path) -> None:
    s = parse_slice(path.stem)
    assert s.name == path.stem  # files are named by slice, in our spelling
    cfg = load_config(path)
    data, fsdp, tensor = resolve_mesh_shape(*cfg.mesh.shape, s.chips)
    assert data * fsdp * tensor == s.chips
    batch = cfg.train.batch_size
    assert batch % s.chips == 0, "train.batch_size must be per-chip batch x chips"
    assert batch % (data * fsdp) == 0, "the batch is split over data x fsdp"
    if s.chips <= jax.device_count():
        mesh = make_mesh(*cfg.mesh.shape, devices=jax.devices()[: s.chips])
        assert dict(mesh.shape) == {"data": data, "fsdp": fsdp, "tensor": tensor}


@pytest.mark.parametrize("path", MESH_YAMLS, ids=lambda p: p.stem)
def test_mesh_config_header_matches_the_hardware_table(path: Path) -> None:
    s = parse_slice(path.stem)
    g = s.generation
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    vms = f"{s.hosts} VM" + ("s" if s.hosts > 1 else "")
    assert f"TPU {s.name} (gcloud accelerator type {s.accelerator_type}): {s.chips} chips on {vms}," in header
    assert f"{g.hbm_gib} GiB HBM per chip" in header
    assert f"runtime image {g.runtime_version}, topology {s.topology}." in header
    per_chip, chips, total = map(int, re.search(r"Batch: (\d+) per chip x (\d+) chips = (\d+)", header).groups())
    assert chips == s.chips and per_chip * chips == total == load_config(path).train.batch_size


@pytest.mark.parametrize("path", MESH_YAMLS, ids=lambda p: p.stem)
def test_mesh_config_header_commands_dry_run(
    path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The commands in the header are real: they parse and produce gcloud lines for this very slice.
    monkeypatch.chdir(ROOT)
    text = "\n".join(line.removeprefix("#") for line in path.read_text().splitlines() if line.startswith("#"))
    joined = text.replace("\\\n", " ")  # shell line continuations
    commands = [shlex.split(line.split("python tpu/tpu.py", 1)[1]) for line in joined.splitlines() if "tpu.py" in line]
    assert [c[0] for c in commands] == ["create", "launch"]
    create, launch = (dry_run(capsys, *c) for c in commands)
    assert f"--accelerator-type={parse_slice(path.stem).accelerator_type}" in create[0]
    assert f"--mesh configs/mesh/{path.stem}.yaml" in text
    assert f"mesh.fsdp={load_config(path).mesh.fsdp}" in launch[1]


def test_generation_table_is_the_only_runtime_source() -> None:
    # The runtime images named anywhere in flux_jax/ come from GENERATIONS alone.
    runtimes = {g.runtime_version for g in GENERATIONS.values()}
    assert runtimes == {"tpu-ubuntu2204-base", "v2-alpha-tpuv5-lite", "v2-alpha-tpuv5", "v2-alpha-tpuv6e"}
    for py in (ROOT / "flux_jax").rglob("*.py"):
        text = py.read_text()
        for runtime in runtimes:
            found = len(re.findall(rf"{re.escape(runtime)}(?![-\w])", text))
            assert found <= (1 if py.name == "hardware.py" else 0), (py, runtime)


def test_launched_jobs_initialise_jax_distributed() -> None:
    from flux_jax.train.distributed import ENV_FLAG

    assert tpu_launch.DISTRIBUTED_ENV == f"{ENV_FLAG}=1"
    # A user --env comes after it, so `--env FLUX_JAX_DISTRIBUTED=0` wins.
    script = launch_script("train", [], ["FLUX_JAX_DISTRIBUTED=0"])
    assert "exec env FLUX_JAX_DISTRIBUTED=1 FLUX_JAX_DISTRIBUTED=0 flux-jax-venv/bin/flux-jax train" in script
