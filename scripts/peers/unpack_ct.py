"""Unpack every packed tensor of compressed-tensors (pack-quantized) checkpoints with compressed-tensors' own
unpacker; save the integers.

Runs inside the `int4-loaders` peer environment (tests/peer_env.py), never in mergeq's own. It reads the
safetensors files directly, so it works whatever the model family (MoE expert tensors included).

Usage: python unpack_ct.py MODEL_DIR OUT.safetensors [MODEL_DIR OUT.safetensors ...]
For each module P with `P.weight_packed`, writes `codes:P` (int8 [out, in], compressed-tensors' signed codes)
and, for asymmetric checkpoints, `zeros:P` (int8 [out, groups], its signed zero points); prints one JSON line
per model.
"""

import json
import os
import sys

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors import safe_open
from safetensors.torch import save_file


def unpack(model_dir: str, out: str) -> None:
    with open(os.path.join(model_dir, "config.json")) as handle:
        qconfig = json.load(handle)["quantization_config"]
    weights = next(iter(qconfig["config_groups"].values()))["weights"]
    bits = int(weights["num_bits"])
    tensors = {}
    for file in sorted(os.listdir(model_dir)):
        if not file.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(model_dir, file), "pt") as handle:
            names = set(handle.keys())
            for name in sorted(n for n in names if n.endswith(".weight_packed")):
                prefix = name[: -len(".weight_packed")]
                shape = torch.Size(handle.get_tensor(f"{prefix}.weight_shape").tolist())
                tensors[f"codes:{prefix}"] = unpack_from_int32(handle.get_tensor(name), bits, shape, packed_dim=1)
                if f"{prefix}.weight_zero_point" in names:
                    groups = handle.get_tensor(f"{prefix}.weight_scale").shape[-1]
                    tensors[f"zeros:{prefix}"] = unpack_from_int32(
                        handle.get_tensor(f"{prefix}.weight_zero_point"),
                        bits,
                        torch.Size([shape[0], groups]),
                        packed_dim=0,
                    )
    save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    print(json.dumps({"model": model_dir, "modules": sum(k.startswith("codes:") for k in tensors)}), flush=True)


def main() -> None:
    pairs = sys.argv[1:]
    if not pairs or len(pairs) % 2:
        sys.exit(__doc__)
    for model_dir, out in zip(pairs[::2], pairs[1::2]):
        unpack(model_dir, out)


if __name__ == "__main__":
    main()
