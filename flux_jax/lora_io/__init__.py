"""LoRA files for the PyTorch world: export (kohya, diffusers, ComfyUI), import of any common format, merging.

weights = lora_weights_from_model(model)          # {"double_blocks.3.img_attn.qkv": LoraWeights, ...}
write_lora_file("out.safetensors", weights, "kohya", config=model.config)
apply_lora_file(model, "some_lora.safetensors", scale=1.0)
convert_lora_file("in.safetensors", "out.safetensors", "diffusers")
merge_lora("flux1-dev.safetensors", weights, "merged.safetensors", layout="bfl")
"""
