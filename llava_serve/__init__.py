"""llava-serve: serving for LLaVA-family vision-language models."""

__version__ = "0.1.0"
