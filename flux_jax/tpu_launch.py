"""Cloud TPU launch commands: the gcloud invocations behind ``tpu/tpu.py``.

Every action (create, install, launch, logs, stop, delete, status, ssh) is a pure function from its
arguments to a list of gcloud argv lists, so ``--dry-run`` prints exactly what would run and the tests
check it without gcloud. The remote side is plain bash run through ``gcloud ... ssh --worker=all``:

* ``install`` makes a Python 3.11 venv ``~/flux-jax-venv`` on every worker (uv fetches 3.11, since the
  TPU images ship Ubuntu 22.04's 3.10) and pip-installs ``flux-jax[tpu]`` from a git URL or a copied
  wheel / sdist.
* ``launch`` copies the run config to ``~/flux-jax-run/<job>.yaml`` on every worker and starts
  ``flux-jax <job> --config ... key=value ...`` detached (``setsid nohup``), so it outlives the ssh
  session; the process writes ``~/flux-jax-run/<job>.log`` and ``<job>.pid``. Every worker runs the same
  command with ``FLUX_JAX_DISTRIBUTED=1``, so flux-jax calls ``jax.distributed.initialize()``, which finds
  the other workers from the TPU metadata and joins them into one job.
* ``stop`` sends SIGTERM to that process group (the trainer saves a checkpoint on SIGTERM) and waits.

A mesh config (``configs/mesh/<slice>.yaml``) is folded into the command line as ``key=value``
overrides placed before the user's own, so one recipe config serves every slice and the user's
overrides still win.

The hardware facts (runtime image, HBM, TensorCores per chip, chips per VM) live in ``flux_jax.hardware``
(``GENERATIONS``) and nowhere else; the mesh configs' header comments are checked against it by the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from flux_jax import typed_config
from flux_jax.errors import FluxJaxError
from flux_jax.hardware import Slice, SliceError, parse_slice
from flux_jax.run_config import load_config

log = logging.getLogger(__name__)

GCLOUD = "gcloud"
# Remote paths are relative to the worker user's home directory; every remote script starts with `cd ~`.
VENV = "flux-jax-venv"
RUN_DIR = "flux-jax-run"
JOBS = ("train", "cache")
# Every launched job calls jax.distributed.initialize() (flux_jax.train.distributed.ENV_FLAG): on a TPU VM it
# finds the workers from the TPU metadata, one host or many, and orbax needs it for multi-host saves.
# `--env FLUX_JAX_DISTRIBUTED=0` turns it off again (env applies assignments in order).
DISTRIBUTED_ENV = "FLUX_JAX_DISTRIBUTED=1"
DEFAULT_PYTHON = "3.11"


TpuLaunchError = SliceError
"""A slice name, mesh file, override or launcher argument is invalid.

The same class as ``flux_jax.hardware.SliceError`` (which cannot import this module to subclass it), so one
``except TpuLaunchError`` covers a bad slice from ``parse_slice`` as well as the launcher's own errors."""


# --------------------------------------------------------------------------------------------------
# Mesh configs -> overrides


def _yaml_value(value: Any) -> str:
    """A value as one line of YAML that ``run_config.parse_override`` reads back to the same value."""
    if isinstance(value, str) and value == "":
        return ""  # parse_override reads an empty value as the empty string
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return text.removesuffix("...").strip()


def _flatten(node: Mapping[str, Any], prefix: str = "") -> list[str]:
    items = []
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            items.extend(_flatten(value, dotted))
        elif value is not None or prefix:
            # A bare top-level `mesh:` means "all defaults" and sets nothing; a nested null is a value.
            items.append(f"{dotted}={_yaml_value(value)}")
    return items


def mesh_overrides(path: str | Path) -> list[str]:
    """The ``key=value`` overrides that apply a (partial) config file such as ``configs/mesh/v5e-8.yaml``.

    The file is validated with ``load_config`` first, so a typo fails here, before any TPU is rented.
    Only the keys the file sets are returned, in file order.
    """
    path = Path(path)
    load_config(path)
    raw = typed_config.read_yaml_file(path) or {}  # the config loader's reader: duplicate keys are errors
    return _flatten(raw)


# --------------------------------------------------------------------------------------------------
# gcloud commands


@dataclasses.dataclass(frozen=True)
class Target:
    """Which TPU a command addresses. ``zone`` / ``project`` None: gcloud's configured defaults."""

    name: str
    zone: str | None = None
    project: str | None = None

    def __post_init__(self) -> None:
        # TPU node ids: lowercase letters, digits and hyphens, starting with a letter (GCE naming).
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", self.name):
            raise TpuLaunchError(
                f"TPU name {self.name!r} must be lowercase letters, digits and hyphens, start with a letter "
                "and not end with a hyphen"
            )

    def flags(self) -> list[str]:
        out = []
        if self.zone:
            out.append(f"--zone={self.zone}")
        if self.project:
            out.append(f"--project={self.project}")
        return out


def _tpu_vm(verb: str, target: Target, *rest: str) -> list[str]:
    return [GCLOUD, "compute", "tpus", "tpu-vm", verb, target.name, *target.flags(), *rest]


def _queued(verb: str, target: Target, *rest: str) -> list[str]:
    return [GCLOUD, "compute", "tpus", "queued-resources", verb, target.name, *target.flags(), *rest]


def ssh_command(target: Target, script: str, worker: str = "all") -> list[str]:
    return _tpu_vm("ssh", target, f"--worker={worker}", f"--command={script}")


def scp_command(target: Target, local: str, remote: str, worker: str = "all") -> list[str]:
    return [
        GCLOUD,
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        local,
        f"{target.name}:{remote}",
        *target.flags(),
        f"--worker={worker}",
    ]


def create_commands(
    target: Target, slice_: Slice, *, spot: bool = False, queued: bool = False, version: str | None = None
) -> list[list[str]]:
    """A TPU VM, or a queued resource whose node gets the same name (so every later command uses it)."""
    runtime = version or slice_.generation.runtime_version
    extra = ["--spot"] if spot else []
    if queued:
        return [
            _queued(
                "create",
                target,
                f"--node-id={target.name}",
                f"--accelerator-type={slice_.accelerator_type}",
                f"--runtime-version={runtime}",
                *extra,
            )
        ]
    return [_tpu_vm("create", target, f"--accelerator-type={slice_.accelerator_type}", f"--version={runtime}", *extra)]


def _is_local_package(source: str) -> bool:
    return source.endswith((".whl", ".tar.gz", ".zip")) and "://" not in source


def install_script(requirement: str, python: str = DEFAULT_PYTHON) -> str:
    """Bash for every worker: a venv with ``python`` (fetched by uv if the image lacks it), then pip."""
    return "; ".join(
        [
            "set -euo pipefail",
            "cd ~",
            f"mkdir -p {RUN_DIR}",
            # Newer images mark the system Python externally managed (PEP 668); older pips lack the flag.
            "python3 -m pip install --user --quiet --upgrade uv "
            "|| python3 -m pip install --user --quiet --upgrade --break-system-packages uv",
            # bin/pip appears only once seeding finished, so a half-made venv is rebuilt, not reused.
            f"test -x {VENV}/bin/pip || {{ rm -rf {VENV} && python3 -m uv venv --seed --python {shlex.quote(python)} "
            f"{VENV}; }}",
            f"{VENV}/bin/python -m pip install --quiet --upgrade pip",
            f"{VENV}/bin/python -m pip install --upgrade {shlex.quote(requirement)}",
            # A rebuilt wheel or a moved branch keeps its version number; pip would skip it as satisfied.
            f"{VENV}/bin/python -m pip install --quiet --force-reinstall --no-deps {shlex.quote(requirement)}",
            f'echo "flux-jax installed on $(hostname): $({VENV}/bin/flux-jax --help > /dev/null && echo ok)"',
        ]
    )


def install_commands(target: Target, source: str, *, python: str = DEFAULT_PYTHON) -> list[list[str]]:
    """``source``: a pip VCS URL (``git+https://...@ref``) or a local wheel / sdist, copied to each worker."""
    if _is_local_package(source):
        local = Path(source)
        if not local.is_file():
            raise TpuLaunchError(f"package {source} does not exist (build one with `pip wheel --no-deps -w dist .`)")
        # Copied into the home directory; pip takes extras on a local archive path, and ./ keeps the
        # path from being read as a project name.
        return [
            scp_command(target, str(local), local.name),
            ssh_command(target, install_script(f"./{local.name}[tpu]", python)),
        ]
    if "://" not in source:
        raise TpuLaunchError(f"install source {source!r} is neither a URL (git+https://...) nor a .whl / .tar.gz file")
    return [ssh_command(target, install_script(f"flux-jax[tpu] @ {source}", python))]


def _paths(job: str) -> tuple[str, str, str]:
    if job not in JOBS:
        raise TpuLaunchError(f"job {job!r} is not one of {', '.join(JOBS)}")
    return f"{RUN_DIR}/{job}.yaml", f"{RUN_DIR}/{job}.log", f"{RUN_DIR}/{job}.pid"


# Alive and not a zombie: `ps` prints nothing (and fails) for a missing pid, "Z..." for a zombie.
_ALIVE = 'alive() { s=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${s#Z}" = "$s" ]; }'


def launch_script(job: str, overrides: Sequence[str] = (), env: Sequence[str] = ()) -> str:
    """Bash for every worker: refuse if the job already runs, then start it detached, appending to its log."""
    config, log_file, pid = _paths(job)
    program = ["env", DISTRIBUTED_ENV, *env, f"{VENV}/bin/flux-jax", job, "--config", config, *overrides]
    # The inner shell records its own pid, then execs flux-jax under that pid; setsid made it a process
    # group leader, so `stop` can signal the whole group (data-loader workers included).
    inner = f"echo $$ > {pid}; exec {shlex.join(program)}"
    return "; ".join(
        [
            "set -eu",
            "cd ~",
            f"mkdir -p {RUN_DIR}",
            _ALIVE,
            f'if [ -f {pid} ] && alive "$(cat {pid})"; then '
            f'echo "flux-jax {job} is already running on $(hostname) (pid $(cat {pid})); stop it first" >&2; '
            "exit 1; fi",
            f'echo "=== flux-jax {job} launched $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname) ===" >> {log_file}',
            # `&` ends the background command; a `;` after it would be a bash syntax error.
            f"setsid nohup bash -c {shlex.quote(inner)} >> {log_file} 2>&1 < /dev/null & "
            f'echo "started flux-jax {job} on $(hostname); log: ~/{log_file}"',
        ]
    )


def launch_commands(
    target: Target,
    job: str,
    config: str | Path,
    overrides: Sequence[str] = (),
    *,
    mesh: str | Path | None = None,
    env: Sequence[str] = (),
) -> list[list[str]]:
    """Copy ``config`` to every worker, then start ``flux-jax <job>`` on all of them at once.

    The full override list (mesh file first, then ``overrides``) is validated against ``config`` here.
    """
    remote_config, _, _ = _paths(job)
    config = Path(config)
    for item in env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item):
            raise TpuLaunchError(f"--env {item!r} is not of the form NAME=value")
    full = [*(mesh_overrides(mesh) if mesh is not None else []), *overrides]
    cfg = load_config(config, full)
    if "://" not in cfg.output_dir:
        # Each worker has its own disk: a multi-host checkpoint needs one shared path (gs://).
        log.warning(
            "output_dir %r is local to each worker; on a multi-host slice use a shared gs:// path", cfg.output_dir
        )
    return [
        scp_command(target, str(config), remote_config),
        ssh_command(target, launch_script(job, full, env)),
    ]


def logs_commands(
    target: Target, job: str, *, worker: str = "0", lines: int = 100, follow: bool = True
) -> list[list[str]]:
    _, log_file, _ = _paths(job)
    tail = f"tail -n {int(lines)} {'-F ' if follow else ''}~/{log_file}"
    return [ssh_command(target, tail, worker=worker)]


def stop_script(job: str, timeout_s: int = 600) -> str:
    """Bash for every worker: SIGTERM the job's process group and wait for it to finish its checkpoint."""
    _, _, pid = _paths(job)
    return "; ".join(
        [
            "cd ~",
            _ALIVE,
            f'if [ ! -f {pid} ] || ! alive "$(cat {pid})"; then echo "flux-jax {job} is not running on $(hostname)"; '
            "exit 0; fi",
            f"p=$(cat {pid})",
            'kill -TERM -- "-$p"',
            f'for _ in $(seq {int(timeout_s)}); do alive "$p" || {{ echo "flux-jax {job} stopped on $(hostname)"; '
            "exit 0; }; sleep 1; done",
            f'echo "flux-jax {job} (pid $p) still running on $(hostname) after {int(timeout_s)} s; '
            'force it with: kill -KILL -- -$p" >&2',
            "exit 1",
        ]
    )


def stop_commands(target: Target, job: str, *, timeout_s: int = 600) -> list[list[str]]:
    return [ssh_command(target, stop_script(job, timeout_s))]


def delete_commands(target: Target, *, queued: bool = False, yes: bool = False) -> list[list[str]]:
    """Deleting a queued resource with --force deletes its TPU VM too."""
    quiet = ["--quiet"] if yes else []
    if queued:
        return [_queued("delete", target, "--force", *quiet)]
    return [_tpu_vm("delete", target, *quiet)]


def status_commands(target: Target, *, queued: bool = False) -> list[list[str]]:
    return [_queued("describe", target) if queued else _tpu_vm("describe", target)]


# --------------------------------------------------------------------------------------------------
# CLI (tpu/tpu.py is a thin shim over main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpu/tpu.py",
        description="Create Cloud TPU VMs, install flux-jax on every worker, launch, follow, stop and delete runs.",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--name", required=True, help="TPU VM (node) name; also the queued-resource id")
        p.add_argument("--zone", help="e.g. us-west4-a (default: gcloud's compute/zone)")
        p.add_argument("--project", help="default: gcloud's core/project")
        p.add_argument("--dry-run", action="store_true", help="print the gcloud commands instead of running them")
        return p

    p = add("create", "create a TPU VM, or a queued resource with --queued")
    p.add_argument("--slice", required=True, help="e.g. v5e-8, v5p-8, v6e-8 (gcloud's v5litepod-8 works too)")
    p.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, preemptible at any time")
    p.add_argument("--queued", action="store_true", help="request through the queued-resources API")
    p.add_argument("--version", help="runtime image (default: the generation's JAX image)")

    p = add("install", "install flux-jax[tpu] into ~/flux-jax-venv on every worker")
    p.add_argument("--source", required=True, help="git+https://github.com/ORG/flux-jax@REF, or a local .whl / sdist")
    p.add_argument("--python", default=DEFAULT_PYTHON, help="Python version for the venv (uv fetches it if missing)")

    p = add("launch", "start `flux-jax JOB --config ...` detached on every worker")
    p.add_argument("job", choices=JOBS)
    p.add_argument("--config", required=True, help="run config (copied to every worker)")
    p.add_argument("--mesh", help="a configs/mesh/*.yaml whose keys become overrides before yours")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment for the job")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for flux-jax train")

    p = add("logs", "print (and follow) a job's log on one worker")
    p.add_argument("job", nargs="?", default="train", choices=JOBS)
    p.add_argument("--worker", default="0", help="worker index, or all")
    p.add_argument("--lines", type=int, default=100)
    p.add_argument("--no-follow", action="store_true")

    p = add("stop", "SIGTERM a job on every worker (the trainer checkpoints) and wait for it to exit")
    p.add_argument("job", nargs="?", default="train", choices=JOBS)
    p.add_argument("--timeout", type=int, default=600, help="seconds to wait for the exit")

    p = add("delete", "delete the TPU VM (or the queued resource and its VM)")
    p.add_argument("--queued", action="store_true")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    p = add("status", "describe the TPU VM or queued resource")
    p.add_argument("--queued", action="store_true")

    p = add("ssh", "run one shell command on every worker (e.g. copy a checkpoint from gs://)")
    p.add_argument("--command", required=True, dest="remote_command")
    p.add_argument("--worker", default="all")
    return parser


def commands_for(args: argparse.Namespace) -> list[list[str]]:
    target = Target(args.name, args.zone, args.project)
    match args.action:
        case "create":
            return create_commands(
                target, parse_slice(args.slice), spot=args.spot, queued=args.queued, version=args.version
            )
        case "install":
            return install_commands(target, args.source, python=args.python)
        case "launch":
            return launch_commands(target, args.job, args.config, args.overrides, mesh=args.mesh, env=args.env)
        case "logs":
            return logs_commands(target, args.job, worker=args.worker, lines=args.lines, follow=not args.no_follow)
        case "stop":
            return stop_commands(target, args.job, timeout_s=args.timeout)
        case "delete":
            return delete_commands(target, queued=args.queued, yes=args.yes)
        case "status":
            return status_commands(target, queued=args.queued)
        case "ssh":
            return [ssh_command(target, args.remote_command, worker=args.worker)]
    raise AssertionError(args.action)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow the options (`launch train --config c.yaml a.b=1`), which argparse's positional
    # matching does not allow with subparsers; collect the leftovers and accept them only as overrides.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.action != "launch" or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        commands = commands_for(args)
        if args.dry_run:
            for argv_ in commands:
                print(shlex.join(argv_))
            return 0
        if shutil.which(GCLOUD) is None:
            raise TpuLaunchError("gcloud is not on PATH: install the Google Cloud CLI, or use --dry-run")
        for argv_ in commands:
            print(f"+ {shlex.join(argv_)}", file=sys.stderr, flush=True)
            rc = subprocess.run(argv_).returncode
            if rc:
                print(f"tpu.py {args.action}: error: gcloud exited with status {rc}", file=sys.stderr)
                return rc
        return 0
    except FluxJaxError as e:
        print(f"tpu.py {args.action}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
