"""mergeq's own int4 engine: RTN, GPTQ and AWQ, streamed one decoder layer at a time, written in vLLM's formats.

Modules, one concept each:
- quant: the group quantization math (scales, zero points, codes) and bit packing.
- gptq / awq: the two calibration algorithms, acting on one group of linears at a time.
- calibration: calibration text -> token samples.
- layerwise: the streaming loop (one decoder layer in memory at a time, resumable after a kill: resume).
- layer: one decoder layer's units (linears reading one input, fused experts) and the capture of their inputs.
- passes: the RTN, GPTQ and AWQ passes over one layer (AWQ's scale folds and their check).
- formats: writers and readers for gptq, awq and compressed-tensors checkpoints.
- kernels: preflight checks and the prediction of the vLLM kernel per tensor-parallel size.
"""
