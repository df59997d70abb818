"""A local, in-memory GCS server for tests: `python tests/helpers/fake_gcs.py PORT BUCKET`.

gcp-storage-emulator's JSON API with the parts of GCS's generation contract that it lacks and tensorstore relies on:
media downloads carry the object's generation in `x-goog-generation`, and the `ifGenerationMatch` /
`ifGenerationNotMatch` preconditions of a read are honoured (412 / 304), which OCDBT (orbax's array writer) uses to
re-read its manifest only when it changed; uploads and deletes honour `ifGenerationMatch` too (412 when it does not
hold; 0 means "the object must not exist"), which the run directory's lease (flux_jax.train.lease) uses to create
its object only if absent and to replace or remove it only if it is still the one it read.
"""

from __future__ import annotations

import sys
import time
from http import HTTPStatus

from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.server import create_server

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    generation = str(obj["generation"])
    query = {k: v[0] for k, v in request.query.items()}
    if "ifGenerationMatch" in query and query["ifGenerationMatch"] != generation:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return
    response["x-goog-generation"] = generation
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    if "ifGenerationNotMatch" in query and query["ifGenerationNotMatch"] == generation:
        response.status = HTTPStatus.NOT_MODIFIED
        return
    _download(request, response, storage, *args, **kwargs)


objects.download = download  # objects.get (the JSON API's alt=media) calls it through the module


def _generation_precondition_fails(request, storage, object_id) -> bool:
    """Whether the request's `ifGenerationMatch` (if any) does not hold for the object as it is now."""
    want = request.query.get("ifGenerationMatch")
    if not want:
        return False
    try:
        current = str(storage.get_file_obj(request.params["bucket_name"], object_id)["generation"])
    except NotFound:
        current = "0"
    return want[0] != current


def _with_precondition(handler, object_id_of):
    def checked(request, response, storage, *args, **kwargs):
        object_id = object_id_of(request)
        if object_id is not None and _generation_precondition_fails(request, storage, object_id):
            response.status = HTTPStatus.PRECONDITION_FAILED
            return
        return handler(request, response, storage, *args, **kwargs)

    return checked


_PATCHED = {
    objects.insert: _with_precondition(objects.insert, lambda r: (r.query.get("name") or [None])[0]),
    objects.delete: _with_precondition(objects.delete, lambda r: r.params.get("object_id")),
}
# The server's route table holds the handler functions themselves; its upload fallback goes through the module.
for _route, _methods in emulator_server.HANDLERS:
    for _method, _handler in list(_methods.items()):
        if _handler in _PATCHED:
            _methods[_method] = _PATCHED[_handler]
objects.insert, objects.delete = _PATCHED[objects.insert], _PATCHED[objects.delete]


def main() -> None:
    port, bucket = int(sys.argv[1]), sys.argv[2]
    server = create_server("localhost", port, in_memory=True, default_bucket=bucket)
    server.start()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
