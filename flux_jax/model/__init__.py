"""The Flux.1 transformer in Flax NNX."""
