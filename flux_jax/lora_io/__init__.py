"""LoRA files for the PyTorch world: export (kohya, diffusers, ComfyUI), import of any common format, merging.

Text-encoder parts of a whole LoRA (CLIP-L, T5) ride along in every format (`text_encoders`). File formats and
model <-> `LoraWeights` only; reading a LoRA out of a training run is `flux_jax.train.lora_sources`.

    weights = adapters.lora_weights_from_model(model)   # {"double_blocks.3.img_attn.qkv": LoraWeights, ...}
    export.write_lora_file("out.safetensors", weights, "kohya", config=model.config)
    import_.apply_lora_file(model, "some_lora.safetensors", scale=1.0)
    export.convert_lora_file("in.safetensors", "out.safetensors", "diffusers")
    merge.merge_lora("flux1-dev.safetensors", weights, "merged.safetensors", layout="bfl")
"""
