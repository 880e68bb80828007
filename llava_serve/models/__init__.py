"""Model loading: HF checkpoints, original LLaVA format, quantization, prompt templates, images.

Nothing is imported here, so that light modules (flags, image checks) do not pull in torch."""
