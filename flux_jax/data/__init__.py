"""All training data: images and captions to training batches (the only data package).

- `sources`: a kohya-style image folder (or metadata.jsonl/csv), or any TFDS dataset; `web_sources`: webdataset
  tar shards (img2dataset's layout) and parquet files (Hugging Face's), local or in a bucket.
- `images`: robust decoding; every bad input is converted or skipped and reported (`DataReport`).
- `buckets`: aspect-ratio buckets (`Bucket`: static shapes) and the crop/resize into them.
- `tfds_builders`: folder -> array_record TFDS dataset; the cache's own TFDS dataset.
- `encoding`, `demo`: the frozen VAE / T5 / CLIP on the mesh; tiny generated demo encoders.
- `cache`, `cache_reader`: `flux-jax cache` (resumable, atomic, repairs a damaged cache) and `LatentCacheReader`;
  `cache_files`: the file table (sizes, CRC-32s) both check; `cache_remote`: a cache in a bucket (gs://), built
  and read through a local copy on each host.
- `pipeline`: `make_train_iterator`, grain over the cache, deterministic and resumable across hosts.
- `examples`: the `Example` every source yields, `ExampleSource` / `DataIterator` (the interface the trainer
  reads), in-memory and `index.json` datasets, the synthetic set and their `BatchIterator`.
- `inputs`: `open_train_data(cfg)`, the trainer's one entry point, whatever `data` names.

Import names from their modules (this file re-exports nothing), so ``import flux_jax.data.encoding`` does not pull in
grain or TensorFlow.
"""
