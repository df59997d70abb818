"""Test-wide setup.

XLA_FLAGS must be set before jax is first imported, so that every test sees 8 fake CPU devices
for sharding tests; pytest imports conftest before any test module.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

# Parity tests compare fp32 against PyTorch's fp32 CPU kernels; XLA's default CPU matmul precision is
# already full fp32, but pin it so a changed default cannot loosen the comparison silently.
jax.config.update("jax_default_matmul_precision", "highest")
