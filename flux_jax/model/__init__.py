"""The Flux.1 transformer in Flax NNX: `config` (FluxConfig, its JSON form, presets), `flux` (the model), `blocks`,
`layers`, `attention`, `rope`, `latents` (2x2 packing and image ids) and `lora` (adapters as `nnx.LoRAParam`)."""
