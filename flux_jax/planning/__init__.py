"""Ahead-of-time fit planning for TPU slices (``flux-jax plan``), on a machine without TPUs.

- ``parse_target("v5e-8" | "v5e:2x4")`` / ``devices(target)``: a slice's compile-only devices from libtpu
  (``topology.py``; the process needs ``aot_environment(target)`` set before JAX starts).
- ``plan(cfg, target)``: compile the run's real train step for the slice and return a ``Plan`` (per-chip HBM
  against capacity, FLOPs, s/step at peak, the time estimate); ``format_report(plan)`` (``fit.py``).
- ``plan_validation(cfg, spec, mesh)``: what validation during training adds: a second base, the VAE decoder,
  the encoded prompts, and the sampler's own peak between steps (``validation.py``; ``validation_spec(cfg)``
  reads the config's ``validation`` section).
- ``count_flops(hlo_text)``: matmul FLOPs of a compiled module with scanned loops counted per iteration
  (``hlo_flops.py``); ``count_traffic(hlo_text)``: its collective (ICI) and estimated HBM bytes, walked the same
  way (``hlo_traffic.py``).
"""
