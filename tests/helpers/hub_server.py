"""A stand-in for the Hugging Face Hub: a local HTTP server answering what huggingface_hub 2.x asks, and the HF
cache layout written by hand.

`FakeHub` serves, for the repositories added to it (files as bytes, one commit per branch or tag):

* ``GET /api/models/{repo}/revision/{rev}``: model info (``sha``, ``siblings``), as ``HfApi.model_info``;
* ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the recursive file listing ``snapshot_download`` takes;
* ``HEAD /{repo}/resolve/{rev}/{file}``: the ``X-Repo-Commit`` / ``ETag`` / ``Content-Length`` headers
  ``hf_hub_download`` reads, and ``GET`` of the same URL with ``Range: bytes=N-`` answered by a 206.

Errors carry the ``X-Error-Code`` header huggingface_hub maps to its exceptions: ``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``, and ``GatedRepo`` (401 without a token, 403 with one) for the files of a
gated repository, whose info and listing stay public as on the Hub. ``drop_once`` names files whose first GET
sends half the body and then closes the connection. Every request is logged (method, path, Range header).

`write_cached_repo` lays a repository out in an HF cache directory as huggingface_hub does:
``models--org--name/blobs/<sha256>``, ``snapshots/<commit>/<path>`` symlinks to them and ``refs/<name>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import os
import threading
import urllib.parse
from pathlib import Path


def commit_of(repo_id: str, revision: str) -> str:
    """A deterministic 40-hex commit hash for a revision of a fake repository."""
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


@dataclasses.dataclass
class Repo:
    files: dict[str, bytes]
    revisions: tuple[str, ...] = ("main",)
    gated: bool = False

    def commit(self, repo_id: str, revision: str) -> str | None:
        """The commit a revision names: a branch / tag of this repo, or one of their commit hashes."""
        commits = {commit_of(repo_id, r): r for r in self.revisions}
        if revision in self.revisions:
            return commit_of(repo_id, revision)
        return revision if revision in commits else None


@dataclasses.dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: bool


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.drop_once: set[tuple[str, str]] = set()  # (repo_id, file)
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, repo_id: str, files: dict[str, bytes], *, revisions=("main",), gated: bool = False) -> None:
        self.repos[repo_id] = Repo(dict(files), tuple(revisions), gated)

    def downloads(self, repo_id: str) -> list[str]:
        """The files of ``repo_id`` whose content was served (GET), in order, repeats included."""
        prefix = f"/{repo_id}/resolve/"
        return [r.path[len(prefix) :].split("/", 1)[1] for r in self.requests if r.method == "GET" and
                r.path.startswith(prefix)]  # fmt: skip

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(hub: FakeHub):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def _send(self, status: int, headers: dict[str, str], body: bytes = b"", *, send_body: bool = True) -> None:
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            if send_body and body:
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str = "", commit: str | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message or code, "Content-Type": "application/json"}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(
                status, headers, json.dumps({"error": message or code}).encode(), send_body=self.command != "HEAD"
            )

        def _json(self, value) -> None:
            self._send(200, {"Content-Type": "application/json"}, json.dumps(value).encode())

        def _serve(self, body: bool) -> None:
            url = urllib.parse.urlsplit(self.path)
            parts = [urllib.parse.unquote(p) for p in url.path.split("/")[1:]]
            hub.requests.append(
                Request(self.command, urllib.parse.unquote(url.path), self.headers.get("Range"),
                        bool(self.headers.get("Authorization")))
            )  # fmt: skip
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                self._api(parts[2] + "/" + parts[3], parts[4:])
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._file(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]), body)
            else:
                self._error(404, "NotFound")

        def _lookup(self, repo_id: str, revision: str) -> tuple[Repo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            commit = repo.commit(repo_id, revision)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None
            return repo, commit

        def _api(self, repo_id: str, rest: list[str]) -> None:
            if not rest or rest[0] == "revision":
                found = self._lookup(repo_id, rest[1] if len(rest) > 1 else "main")
                if found:
                    repo, commit = found
                    self._json({"id": repo_id, "sha": commit, "private": False, "gated": "manual" if repo.gated else
                                False, "siblings": [{"rfilename": f} for f in sorted(repo.files)]})  # fmt: skip
            elif rest[0] == "tree" and len(rest) >= 2:
                found = self._lookup(repo_id, rest[1])
                if found:
                    repo, _ = found
                    prefix = "/".join(rest[2:])
                    self._json([
                        {"type": "file", "path": f, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for f, data in sorted(repo.files.items())
                        if not prefix or f.startswith(prefix + "/")
                    ])  # fmt: skip
            else:
                self._error(404, "NotFound")

        def _file(self, repo_id: str, revision: str, name: str, body: bool) -> None:
            found = self._lookup(repo_id, revision)
            if not found:
                return
            repo, commit = found
            if repo.gated:
                token = self.headers.get("Authorization")
                self._error(403 if token else 401, "GatedRepo", f"Access to model {repo_id} is restricted.")
                return
            if name not in repo.files:
                self._error(404, "EntryNotFound", f"{name} does not exist", commit)
                return
            data = repo.files[name]
            headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}  # fmt: skip
            if not body:
                self.send_response(200)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                return
            start, status = 0, 200
            requested = self.headers.get("Range")
            if requested and requested.startswith("bytes=") and requested.endswith("-"):
                start, status = int(requested[len("bytes=") : -1]), 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            chunk = data[start:]
            if (repo_id, name) in hub.drop_once:
                hub.drop_once.discard((repo_id, name))
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(chunk))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(chunk[: len(chunk) // 2])
                self.wfile.flush()
                self.close_connection = True  # the client sees the body end early
                return
            self._send(status, headers, chunk)

    return Handler


def write_cached_repo(cache: Path, repo_id: str, files: dict[str, bytes], *, commit: str,
                      refs: tuple[str, ...] = ("main",)) -> Path:  # fmt: skip
    """Lay ``files`` out in the HF cache ``cache`` as huggingface_hub does for ``repo_id`` at ``commit`` (with each
    ref in ``refs`` naming it); returns the snapshot folder."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by its "/"-separated relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
