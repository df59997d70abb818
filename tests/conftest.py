"""Test-wide setup.

XLA_FLAGS must be set before jax is first imported, so that every test sees 8 fake CPU devices
for sharding tests; pytest imports conftest before any test module.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One BLAS thread per process: pytest-xdist runs a worker per core, and OpenBLAS's own threads on top of that spin
# against each other (a 384 x 64 SVD took 1 s instead of 2 ms on the 2-core machine). Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

# Parity tests compare fp32 against PyTorch's fp32 CPU kernels; XLA's default CPU matmul precision is
# already full fp32, but pin it so a changed default cannot loosen the comparison silently.
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

from tests.helpers.compile_cache import persistent_compile_cache  # noqa: E402


@pytest.fixture(scope="module")
def train_compile_cache(tmp_path_factory):
    """One persistent compile cache for the trainer's tests (``pytestmark = pytest.mark.usefixtures(...)``): the
    same tiny model and step are built by many runs in many modules, and test_train_resume.py's children read the
    same directory (tests.helpers.compile_cache.child_env), so only the session's first build compiles. Needs the
    8 fake devices set above (a run with its own XLA_FLAGS may have fewer)."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (conftest.py forces 8 fake CPU devices)")
    with persistent_compile_cache(tmp_path_factory.getbasetemp() / "train-xla-cache"):
        yield
