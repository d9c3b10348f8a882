"""mergeq: merge LoRA/QLoRA adapters, then export GGUF, AWQ and GPTQ artifacts with reports."""

__version__ = "0.1.0"
