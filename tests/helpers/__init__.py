"""Shared test helpers: PyTorch references, LoRA fixtures, the fake GCS server, the compile cache (no tests here)."""
