"""mergeq's own int4 engine: RTN, GPTQ and AWQ, streamed one decoder layer at a time, written in vLLM's formats.

Modules, one concept each:
- quant: the group quantization math (scales, zero points, codes) and bit packing.
- gptq / awq: the two calibration algorithms, acting on one group of linears at a time.
- arch: architecture mappings (Llama, Mistral, Qwen2) as data.
- calibration: calibration text -> token samples.
- layerwise: the streaming engine (one decoder layer in memory at a time).
- formats: writers and readers for gptq, awq and compressed-tensors checkpoints.
- kernels: preflight checks and the prediction of the vLLM kernel per tensor-parallel size.
"""
