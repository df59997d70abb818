"""LoRA files for the PyTorch world: export (kohya, diffusers, ComfyUI), import of any common format, merging.

weights = lora_weights_from_model(model)          # {"double_blocks.3.img_attn.qkv": LoraWeights, ...}
write_lora_file("out.safetensors", weights, "kohya", config=model.config)
apply_lora_file(model, "some_lora.safetensors", scale=1.0)
convert_lora_file("in.safetensors", "out.safetensors", "diffusers")
merge_lora("flux1-dev.safetensors", weights, "merged.safetensors", layout="bfl")
"""

from flux_jax.lora_io.adapters import apply_lora_weights, lora_weights_from_model
from flux_jax.lora_io.export import convert_lora_file, export_lora, export_metadata, write_lora_file
from flux_jax.lora_io.formats import FORMATS
from flux_jax.lora_io.import_ import LoraFile, apply_lora_file, load_lora_file, read_lora_file
from flux_jax.lora_io.merge import merge_lora
from flux_jax.lora_io.weights import LoraWeights

__all__ = [
    "FORMATS",
    "LoraFile",
    "LoraWeights",
    "apply_lora_file",
    "apply_lora_weights",
    "convert_lora_file",
    "export_lora",
    "export_metadata",
    "load_lora_file",
    "lora_weights_from_model",
    "merge_lora",
    "read_lora_file",
    "write_lora_file",
]
