"""A local, in-memory GCS server for tests: `python tests/helpers/fake_gcs.py PORT BUCKET`.

gcp-storage-emulator's JSON API with the two parts of GCS's download contract that it lacks and tensorstore (orbax's
array writer) relies on: media downloads carry the object's generation in `x-goog-generation`, and the
`ifGenerationMatch` / `ifGenerationNotMatch` preconditions of a read are honoured (412 / 304), which OCDBT uses to
re-read its manifest only when it changed.
"""

from __future__ import annotations

import sys
import time
from http import HTTPStatus

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


def main() -> None:
    port, bucket = int(sys.argv[1]), sys.argv[2]
    server = create_server("localhost", port, in_memory=True, default_bucket=bucket)
    server.start()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
