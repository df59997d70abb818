"""Images and captions to training batches: sources, bad-data handling, buckets, the latent cache, the pipeline.

- `sources`: a kohya-style image folder (or metadata.jsonl/csv), or any TFDS dataset.
- `images`: robust decoding; every bad input is converted or skipped and reported (`DataReport`).
- `buckets`: aspect-ratio buckets (static shapes) and the crop/resize into them.
- `tfds_builders`: folder -> array_record TFDS dataset; the cache's own TFDS dataset.
- `encoding`, `demo`: the frozen VAE / T5 / CLIP on the mesh; tiny generated demo encoders.
- `cache`, `cache_reader`: `flux-jax cache` (resumable, atomic) and `LatentCacheReader`.
- `pipeline`: `make_train_iterator`, grain over the cache, deterministic and resumable across hosts.

The names below are imported on first use, so ``import flux_jax.data.encoding`` (the encoders alone, e.g. on a
benchmark machine without grain or TensorFlow) does not pull in the rest.
"""
