"""mergeq: merge LoRA/QLoRA adapters, then export GGUF, AWQ and GPTQ artifacts with reports."""

from mergeq.core import VERSION as __version__

__all__ = ["__version__"]
