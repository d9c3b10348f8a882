"""`mergeq merge --base PATH --adapter PATH[@WEIGHT] [--adapter ...] --out DIR [--dtype float16|bfloat16]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def run(args) -> int:
    from merge.merger import AdapterRef, MergeConfig, run_merge
    from merge.qlora import QuantSettings

    requantize = None
    if args.requantize:  # the older spelling of --qlora nf4|fp4, with every setting explicit
        requantize = QuantSettings(args.requantize, args.quant_blocksize, not args.no_double_quant)
    elif args.quant_blocksize != 64 and args.qlora in ("nf4", "fp4"):
        requantize = QuantSettings(args.qlora, args.quant_blocksize, not args.no_double_quant)
    eval_text = None
    if args.base is not None and args.qlora_base is not None:  # both bases: the target is measured on a text
        from mergeq.textopts import resolve_text_option

        eval_text = resolve_text_option(args.eval_text, option="--eval-text", purpose="evaluation")
    config = MergeConfig(
        base=args.base, adapters=[AdapterRef.parse(a) for a in args.adapter], out=args.out, dtype=args.dtype,
        qlora_base=args.qlora_base, validate=not args.no_validate, overwrite=args.overwrite, requantize=requantize,
        qlora=args.qlora, double_quant=False if args.no_double_quant else None, eval_text=eval_text,
        max_shard_bytes=int(args.max_shard_size * 1024**3), threads=args.threads)
    result = run_merge(config)
    if args.json:
        json.dump({"out": str(result.out), "shards": result.shards, "validation": result.validation,
                   "warnings": result.warnings, "qlora_fidelity": result.manifest.get("qlora_fidelity")},
                  sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        from mergeq.core.progress import stderr_console

        console = stderr_console()
        console.print(f"merged checkpoint: {result.out} ({len(result.shards)} shard(s), {args.dtype})")
        if result.validation and "mean_kl" in result.validation:
            console.print(f"validation: mean KL {result.validation['mean_kl']:.3g}, "
                          f"max |delta logit| {result.validation['max_abs_logit_delta']:.3g}")
        qlora = result.manifest.get("qlora") or {}
        if qlora:
            console.print(f"merge target: {qlora['target']} ({qlora['why']})")
        fidelity = result.manifest.get("qlora_fidelity")
        if fidelity:
            console.print(f"merge targets scored on {fidelity['text']['file']} ({fidelity['scored_tokens']} tokens):")
            for label, numbers in fidelity["candidates"].items():
                console.print(f"merge target {label}: mean KL {numbers['mean_kl']:.3g}"
                              + ("  <- chosen" if label == fidelity["chosen"] else ""))
    return 0


def register(sub) -> None:
    parser = sub.add_parser("merge", help="merge LoRA/QLoRA adapters into their base (fp16/bf16 safetensors)")
    parser.add_argument("--base", type=Path, help="base model folder: fp16/bf16/fp32 safetensors (single or sharded), "
                                                  "a bitsandbytes 4-bit checkpoint, or pytorch_model.bin")
    parser.add_argument("--adapter", action="append", required=True, metavar="PATH[@WEIGHT]",
                        help="PEFT adapter folder; repeat to sum several (task arithmetic), each with an optional weight")
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16", help="output dtype")
    parser.add_argument("--qlora-base", type=Path, help="the bitsandbytes 4-bit base the adapter was trained on; with "
                                                        "--base, both merge targets are compared and the closer is used")
    parser.add_argument("--eval-text", help="with --base and --qlora-base: the text both merges are scored on against "
                                            "the trained model (.txt; .jsonl text/messages; .parquet:COLUMN; `demo`)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-validate", action="store_true", help="skip the comparison with the unmerged PEFT model")
    parser.add_argument("--qlora", choices=("auto", "nf4", "fp4", "off"), default="auto",
                        help="the 4-bit base a QLoRA adapter was trained on, rebuilt from the fp16 --base: auto "
                             "(default) when the adapter folder shows QLoRA training (recorded base name, trainer "
                             "config, model card), nf4/fp4 always, off never")
    parser.add_argument("--requantize", choices=("nf4", "fp4"),
                        help="same as --qlora nf4|fp4, with --quant-blocksize and --no-double-quant taken as given")
    parser.add_argument("--quant-blocksize", type=int, default=64, help="blocksize of the rebuilt 4-bit base (default 64)")
    parser.add_argument("--no-double-quant", action="store_true",
                        help="the rebuilt 4-bit base without double quantization (default: as the evidence says, "
                             "else with it)")
    parser.add_argument("--max-shard-size", type=float, default=2.0, metavar="GIB", help="output shard size (GiB)")
    parser.add_argument("--threads", type=int, default=1,
                        help="compute threads for the streaming merge (default 1; 0 = torch's default)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.set_defaults(run=run)
