"""Hugging Face Hub names wherever a checkpoint path is accepted: resolved to files in the standard HF cache.

Spellings (a string, never a ``pathlib.Path``):

    org/name                              the repository at its main branch
    org/name@revision                     at a branch, tag or commit hash (``refs/pr/N`` too)
    org/name/path/in/repo.safetensors     one file of it
    org/name@revision/path/in/repo        one file or folder of it at that revision

A local path always wins: a string that exists on this machine is that path, whatever it looks like. URLs
(``gs://...``), absolute paths, ``./``, ``../`` and ``~`` paths are never Hub names, nor is anything whose first
two segments are not a valid repository id; those keep the caller's own "no such file" errors.

Only the files needed are fetched, decided from the repository's file listing (``HfApi.model_info`` online, the
cached snapshot offline) for what the caller asks for:

* a transformer (``model.base``, ``validation.base``, ``flux-jax convert SRC``, ``export --merge-into``,
  ``sample --base`` with ``--encoders``): ``transformer/`` of a pipeline repository (the FLUX.1-dev layout), or
  ``config.json`` + ``diffusion_pytorch_model*.safetensors`` (+ index) of a transformer repository
  (ashen0209/Flux-Dev2Pro), or the one ``.safetensors`` file at the root of a single-file repository;
* the encoders (``encoders.root``, ``sample --encoders``): ``vae/``, ``text_encoder/``, ``text_encoder_2/``,
  ``tokenizer/``, ``tokenizer_2/`` and ``model_index.json``;
* a pipeline (``sample --base`` alone): the transformer's and the encoders' files of a pipeline repository;
* one encoder (``encoders.vae`` / ``t5`` / ``clip`` / tokenizers): its pipeline folder, or the whole repository.

Never the root single files of a pipeline repository (FLUX.1-dev's ``flux1-dev.safetensors`` and
``ae.safetensors``, 20+ GB) unless named, and never pickled weights (``.bin``, ``.pt``, ...), which flux-jax does
not read. Downloads show huggingface_hub's own progress bars on stderr; ``HF_TOKEN`` (or ``hf auth login``) opens
gated and private repositories; ``HF_HUB_OFFLINE=1`` resolves from the cache alone, without any network request;
``HF_HUB_CACHE`` / ``HF_HOME`` / ``HF_ENDPOINT`` are honoured as everywhere in huggingface_hub (the library reads
them when it is imported). A dropped connection resumes the file where it stopped (HTTP Range requests,
huggingface_hub's own retries); when the Hub cannot be reached, a complete cached copy is used.

On a pod every host resolves the name itself, into its own HF cache: TPU VM hosts share no disk by default, each
host reads only its own shards from a local file anyway, and a "process 0 downloads, the others wait" scheme would
need a shared filesystem plus a barrier that outlasts a 24 GB download (JAX's distributed barriers time out well
before). Pointing ``HF_HUB_CACHE`` at a filesystem all hosts mount is safe too: huggingface_hub locks each file
while it downloads it, so the first host fetches it and the others wait for the lock and then find it cached.

Errors are one line (`flux_jax.errors.CheckpointError`) naming the name: no such repository, revision or file, a
gated repository without access (with where to accept the license), not cached while offline, the Hub unreachable.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from flux_jax.errors import CheckpointError

log = logging.getLogger(__name__)

Kind = Literal["transformer", "encoders", "pipeline", "folder"]

# A FLUX.1 pipeline repository's encoder folders (flux_jax.data.encoding.ROOT_LAYOUT names the same ones).
ENCODER_FOLDERS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
TRANSFORMER_FOLDER = "transformer"
MODEL_INDEX = "model_index.json"
# Weights flux-jax never reads (it never unpickles; ONNX / TF / Flax-msgpack / GGUF have no reader here).
NEVER_READ = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".msgpack", ".h5", ".onnx", ".onnx_data", ".pb",
              ".gguf", ".ot", ".tflite")  # fmt: skip
DIFFUSERS_WEIGHTS = re.compile(r"diffusion_pytorch_model.*\.safetensors(\.index\.json)?")
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
PR_REVISION = re.compile(r"refs/pr/\d+")
DEFAULT_REVISION = "main"


class NotAPipelineError(CheckpointError):
    """A pipeline was asked for but the repository is not one; ``holds_transformer``: it holds a transformer (its
    encoders must come from elsewhere)."""

    def __init__(self, message: str, holds_transformer: bool) -> None:
        super().__init__(message)
        self.holds_transformer = holds_transformer


@dataclasses.dataclass(frozen=True)
class HubName:
    repo_id: str
    """``org/name``."""
    revision: str | None
    """A branch, tag or commit hash; None = the main branch."""
    path: str
    """A file or folder inside the repository ("/"-separated); "" = the repository itself."""

    @property
    def repo(self) -> str:
        """The repository with its revision, as the user spelled it."""
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def parse(spec: object) -> HubName | None:
    """The Hub name ``spec`` spells, or None when it cannot be one (see the module docstring). Looks at no file."""
    if not isinstance(spec, str) or "://" in spec or "\\" in spec or ":" in spec:
        return None
    if spec.startswith(("/", "./", "../", "~")):
        return None
    parts = spec.rstrip("/").split("/")
    if len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
        return None
    org, name, rest = parts[0], parts[1], parts[2:]
    revision = None
    if "@" in name:
        name, revision = name.split("@", 1)
        if revision == "refs" and PR_REVISION.fullmatch("/".join(["refs", *rest[:2]])):
            revision, rest = "/".join(["refs", *rest[:2]]), rest[2:]
        if not revision:
            return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(f"{org}/{name}")
    except HFValidationError:
        return None
    return HubName(f"{org}/{name}", revision, "/".join(rest))


def resolve_transformer(spec: str | os.PathLike, *, download: bool = True) -> str:
    """A transformer checkpoint: ``spec`` itself unless it is a Hub name, else its local copy (a ``transformer/``
    folder, a transformer repository's folder, or one file). ``download=False``: the cache only, and ``spec``
    unchanged when it is not cached (for the planner, which never downloads)."""
    return _resolve(spec, "transformer", "", download)


def resolve_encoders(spec: str | os.PathLike, *, download: bool = True) -> str:
    """The encoders of a FLUX.1 pipeline: ``spec`` itself unless it is a Hub name, else the local snapshot
    holding its vae/, text_encoder/, text_encoder_2/, tokenizer/ and tokenizer_2/."""
    return _resolve(spec, "encoders", "", download)


def resolve_pipeline(spec: str | os.PathLike, *, download: bool = True) -> str:
    """A whole FLUX.1 pipeline (transformer and encoders): ``spec`` itself unless it is a Hub name, else the local
    snapshot holding them. A repository that is no pipeline raises `NotAPipelineError` before any download."""
    return _resolve(spec, "pipeline", "", download)


def resolve_folder(spec: str | os.PathLike, folder: str, *, download: bool = True) -> str:
    """One encoder (its weights or tokenizer): ``spec`` itself unless it is a Hub name, else the local copy of its
    ``folder`` of a pipeline repository (``vae``, ``text_encoder_2``, ...), of the named file or folder, or of the
    whole repository when it has no such folder."""
    return _resolve(spec, "folder", folder, download)


# (spec, kind, folder, offline, endpoint, cache) -> local path: a process asks the Hub about a name once.
_resolved: dict[tuple, str] = {}


def _resolve(spec: str | os.PathLike, kind: Kind, folder: str, download: bool) -> str:
    if not isinstance(spec, str) or os.path.exists(spec):
        return os.fspath(spec)
    name = parse(spec)
    if name is None:
        return spec
    from huggingface_hub import constants

    offline = _offline() or not download
    key = (spec, kind, folder, offline, constants.ENDPOINT, constants.HF_HUB_CACHE)
    if key not in _resolved:
        if not download:
            try:
                _resolved[key] = _from_cache(spec, name, kind, folder, why="")
            except CheckpointError:
                return spec  # not cached: the caller treats it as not on this machine
        else:
            _resolved[key] = (
                _from_cache(spec, name, kind, folder, why=_OFFLINE) if offline else _download(spec, name, kind, folder)
            )
        log.info("%s: %s", spec, _resolved[key])
    return _resolved[key]


_OFFLINE = "HF_HUB_OFFLINE=1 forbids downloading it: run once without HF_HUB_OFFLINE, or give a local path"


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return flag or constants.is_offline_mode()


# ------------------------------------------------------------------------------------------- what to fetch


def _readable(path: str) -> bool:
    return not path.endswith(NEVER_READ)


def _sample(items: Sequence[str], n: int = 6) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "") if items else "none"


def select(
    spec: str, name: HubName, files: Iterable[str], kind: Kind, folder: str = "", listing: str = ""
) -> tuple[list[str], str]:
    """(the repository files to fetch, the returned path relative to the snapshot) for ``kind`` out of the
    repository's ``files`` ("/"-separated paths). A named path narrows the repository to that file or folder;
    ``listing`` says whose listing it is (the Hub's, the cache's) in the error messages."""
    files = sorted(files)
    if not name.path:
        return _choose(spec, files, kind, folder)
    if name.path in files:
        return [name.path], name.path
    prefix = name.path + "/"
    inside = [f[len(prefix) :] for f in files if f.startswith(prefix)]
    if not inside:
        top = sorted({f.split("/", 1)[0] + ("/" if "/" in f else "") for f in files})
        revision = name.revision or DEFAULT_REVISION
        raise CheckpointError(f"{spec}: no file or folder {name.path!r} in {name.repo_id} at revision {revision}"
                              f"{listing} (its top level: {_sample(top)})")  # fmt: skip
    chosen, result = _choose(spec, inside, kind, folder)
    return [prefix + f for f in chosen], f"{name.path}/{result}".rstrip("/")


def _choose(spec: str, files: list[str], kind: Kind, folder: str) -> tuple[list[str], str]:
    def under(directory: str) -> list[str]:
        return [f for f in files if f.startswith(directory + "/") and _readable(f)]

    transformer = under(TRANSFORMER_FOLDER)
    if kind == "folder":
        return (under(folder), folder) if under(folder) else ([f for f in files if _readable(f)], "")
    if kind == "transformer":
        if transformer:
            return transformer, TRANSFORMER_FOLDER
        top = [f for f in files if "/" not in f]
        weights = [f for f in top if DIFFUSERS_WEIGHTS.fullmatch(f)]
        if "config.json" in top and weights:
            return ["config.json", *weights], ""
        single = [f for f in top if f.endswith(".safetensors")]
        if len(single) == 1:
            return single, single[0]
        found = (f"{len(single)} .safetensors files at its root: name one, e.g. {spec.rstrip('/')}/{single[0]}"
                 if single else "no .safetensors file at its root")  # fmt: skip
        raise CheckpointError(
            f"{spec}: no Flux transformer in the repository (no {TRANSFORMER_FOLDER}/, no config.json with "
            f"diffusion_pytorch_model*.safetensors, {found})"
        )
    missing = [f"{d}/" for d in ENCODER_FOLDERS if not under(d)]
    if kind == "pipeline" and (missing or not transformer):
        try:
            _choose(spec, files, "transformer", folder)
            holds_transformer = True
        except CheckpointError:
            holds_transformer = False
        absent = missing if transformer else [f"{TRANSFORMER_FOLDER}/", *missing]
        raise NotAPipelineError(f"{spec}: not a FLUX.1 pipeline repository: no {', '.join(absent)}", holds_transformer)
    if missing:
        raise CheckpointError(f"{spec}: not a FLUX.1 pipeline repository: no {', '.join(missing)}")
    chosen = [f for d in ENCODER_FOLDERS for f in under(d)] + ([MODEL_INDEX] if MODEL_INDEX in files else [])
    return (transformer + chosen if kind == "pipeline" else chosen), ""


def _literal(path: str) -> str:
    """``path`` as an fnmatch pattern matching only itself (allow_patterns are fnmatch patterns)."""
    return re.sub(r"([*?\[])", r"[\1]", path)


# ------------------------------------------------------------------------------------------- online


def _download(spec: str, name: HubName, kind: Kind, folder: str) -> str:
    """Resolve with the Hub: list the repository, then fetch the selected files (the cache keeps finished ones)."""
    import httpx2
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    revision = name.revision or DEFAULT_REVISION
    try:
        info = HfApi().model_info(name.repo_id, revision=revision)
    except GatedRepoError as e:
        raise CheckpointError(_gated(spec, name, e)) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{spec}: no such local path, and no repository {name.repo_id} on the Hugging Face Hub "
            f"({constants.ENDPOINT}; a private one needs HF_TOKEN or `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(
            f"{spec}: no revision {revision!r} (branch, tag or commit hash) in {name.repo_id} on the Hugging Face Hub"
        ) from None
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code in (401, 403):  # a bad token, not a network failure
            raise CheckpointError(
                f"{spec}: the Hugging Face Hub refused access to {name.repo_id} ({_reason(e)}): check HF_TOKEN "
                "(or `hf auth login`)"
            ) from None
        return _fall_back(spec, name, kind, folder, e)
    except (httpx2.TransportError, OfflineModeIsEnabled) as e:
        return _fall_back(spec, name, kind, folder, e)
    files = [s.rfilename for s in info.siblings or []]
    chosen, result = select(spec, name, files, kind, folder)
    try:
        root = snapshot_download(
            name.repo_id,
            revision=revision,
            cache_dir=constants.HF_HUB_CACHE,
            allow_patterns=[_literal(f) for f in chosen],
        )
    except GatedRepoError as e:  # gating applies to the files: the listing is public
        raise CheckpointError(_gated(spec, name, e)) from None
    except RepositoryNotFoundError as e:  # a private repository's files without a token
        raise CheckpointError(f"{spec}: no access to the files of {name.repo_id} ({_reason(e)}); "
                              "set HF_TOKEN or run `hf auth login`") from None  # fmt: skip
    except (httpx2.TransportError, HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise CheckpointError(
            f"{spec}: downloading from the Hugging Face Hub at {constants.ENDPOINT} failed ({_reason(e)}); "
            "run again to continue (finished files stay in the cache)"
        ) from None
    return os.path.join(root, result) if result else root


def _fall_back(spec: str, name: HubName, kind: Kind, folder: str, error: Exception) -> str:
    """The Hub cannot be reached (or is down): a complete cached copy still serves, as in huggingface_hub itself."""
    from huggingface_hub import constants

    why = f"the Hugging Face Hub at {constants.ENDPOINT} cannot be reached ({_reason(error)}): check the network"
    path = _from_cache(spec, name, kind, folder, why=why)
    log.warning("%s: the Hugging Face Hub cannot be reached (%s); using the cached copy", spec, _reason(error))
    return path


def _gated(spec: str, name: HubName, error: Exception) -> str:
    from huggingface_hub import constants, get_token

    page = f"{constants.ENDPOINT}/{name.repo_id}"
    if get_token() is None:
        return f"{spec}: {name.repo_id} is a gated repository: accept the license at {page} and set HF_TOKEN or run "\
               "`hf auth login`"  # fmt: skip
    return (f"{spec}: {name.repo_id} is a gated repository and the token in use has no access to it: accept the "
            f"license at {page} with that account, or set HF_TOKEN to a token of one that has")  # fmt: skip


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ------------------------------------------------------------------------------------------- the cache


def _from_cache(spec: str, name: HubName, kind: Kind, folder: str, *, why: str) -> str:
    """Resolve from the local HF cache alone (no network): the snapshot of the revision, the files chosen from the
    cached listing (the repository's full listing when huggingface_hub stored one, else the snapshot's files)."""
    from huggingface_hub import constants, get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    cache = Path(constants.HF_HUB_CACHE)
    storage = cache / ("models--" + name.repo_id.replace("/", "--"))
    tail = f"; {why}" if why else ""
    if not (storage / "snapshots").is_dir():
        raise CheckpointError(
            f"{spec}: no such local path, and {name.repo_id} is not in the Hugging Face cache ({cache}){tail}"
        )
    revision = name.revision or DEFAULT_REVISION
    commit = revision
    if not COMMIT_HASH.fullmatch(revision):
        ref = storage / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else ""
    snapshot = storage / "snapshots" / commit
    if not commit or not snapshot.is_dir():
        refs = sorted(p.relative_to(storage / "refs").as_posix() for p in (storage / "refs").rglob("*") if p.is_file())
        snaps = sorted(p.name[:12] for p in (storage / "snapshots").iterdir())
        raise CheckpointError(
            f"{spec}: revision {revision!r} of {name.repo_id} is not in the Hugging Face cache ({cache}; cached: "
            f"{_sample([*refs, *snaps])}){tail}"
        )
    try:
        files = [f.path for f in get_cached_repo_tree(name.repo_id, revision=commit, cache_dir=cache)]
        listing = ""
    except CachedRepoTreeNotFoundError:  # a snapshot huggingface_hub did not list: judge by what it holds
        files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
        listing = " as cached"
    chosen, result = select(spec, name, files, kind, folder, listing)
    missing = [f for f in chosen if not (snapshot / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{spec}: {len(missing)} needed file(s) of {name.repo} are not in the Hugging Face cache "
            f"({_sample(missing, 3)}){tail}"
        )
    return str(snapshot / result) if result else str(snapshot)


def forget() -> None:
    """Forget the names resolved so far in this process (tests change the cache and the endpoint)."""
    _resolved.clear()


__all__ = [
    "ENCODER_FOLDERS",
    "HubName",
    "NotAPipelineError",
    "forget",
    "parse",
    "resolve_encoders",
    "resolve_folder",
    "resolve_pipeline",
    "resolve_transformer",
    "select",
]
