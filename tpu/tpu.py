#!/usr/bin/env python3
"""Cloud TPU launcher for flux-jax: create, install, launch, logs, stop, delete (and status, ssh).

Every action takes --dry-run, which prints the exact gcloud commands instead of running them.

    python tpu/tpu.py create  --name flux-v5e8 --zone us-west4-a --slice v5e-8 --spot
    python tpu/tpu.py install --name flux-v5e8 --zone us-west4-a --source git+https://github.com/ORG/flux-jax@main
    python tpu/tpu.py launch train --name flux-v5e8 --zone us-west4-a \\
        --config configs/dev2pro_lora.yaml --mesh configs/mesh/v5e-8.yaml data.path=gs://BUCKET/data \\
        encoders.root=FLUX.1-dev validation.base=FLUX.1-dev
    python tpu/tpu.py logs    --name flux-v5e8 --zone us-west4-a
    python tpu/tpu.py stop    --name flux-v5e8 --zone us-west4-a
    python tpu/tpu.py delete  --name flux-v5e8 --zone us-west4-a

The command building lives in flux_jax/tpu_launch.py (importable and tested); this file only makes a
source checkout work without installing flux-jax first.
"""

import sys
from pathlib import Path

try:
    from flux_jax.tpu_launch import main
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flux_jax.tpu_launch import main

if __name__ == "__main__":
    sys.exit(main())
