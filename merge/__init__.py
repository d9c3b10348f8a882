"""Merge stage: LoRA/QLoRA adapters + base model -> one fp16/bf16 Hugging Face checkpoint, streamed."""
