"""The Flat-LoRA engine: target discovery, the in-place and forward-time noise paths, and the engine."""
