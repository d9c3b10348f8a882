"""GGUF files that fit a size budget with the least divergence, chosen tensor by tensor from measurements.

    mergeq export gguf --model M --out O --target-size 2.5GB --imatrix --calib FILE
    (or --target-bpw 4.5, or --target like:Q4_K_M: the same size as that named mix)

Modules, in the order the search uses them:

    target       what a target says ("2.5GB", "4.5bpw", "like:Q4_K_M") and the artifact's name
    slots        the quantizable tensors, the types each one's row length allows, exact file sizes
    sensitivity  each candidate type made by llama-quantize and measured (imatrix-weighted relative error)
    calibrate    per-group and per-depth scales from the real KL of a few probe mixes (llama-perplexity)
    allocate     the multiple-choice knapsack: one type per tensor under the byte budget
    search       all of the above for a list of targets, each mix made and measured, the named mix nearest
                 in size made and measured beside it
    artifacts    the exporter's side: the mixes moved into place with their report sections
"""
