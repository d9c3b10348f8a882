"""`mergeq merge --base PATH --adapter PATH[@WEIGHT] [--adapter ...] --out DIR [--dtype float16|bfloat16]`.

The flags are merge.options.MergeConfig's (mergeq.core.options), the schema a pipeline's [merge] table shares."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from merge.options import MergeConfig
from mergeq.core.options import add_options, from_namespace


def run(args) -> int:
    from merge.digests import InputDigests, input_folders
    from mergeq.core.memory import collector_paused

    # the inputs' sha256 first, in a thread, beside the 1-2 s of imports (torch, transformers) that run on one core
    adapters = [ref.path for ref in args.adapters or ()]  # AdapterRef, parsed by the option
    digests = InputDigests(input_folders([args.qlora_base, args.base], adapters), verify=args.verify)
    try:
        with collector_paused():  # torch, imported here
            from merge.merger import run_merge

        config = from_namespace(MergeConfig, args)
        eval_text = None
        if config.base is not None and config.qlora_base is not None:  # both bases: the target is measured on a text
            from mergeq.textopts import resolve_text_option

            eval_text = resolve_text_option(config.eval_text, option="--eval-text", purpose="evaluation")
        config = replace(config, eval_text=eval_text)
        result = run_merge(config, digests)
    finally:
        digests.stop()  # at once when the merge used them; a refusal before that does not wait for them
    if args.json:
        json.dump(
            {
                "out": str(result.out),
                "shards": result.shards,
                "validation": result.validation,
                "warnings": result.warnings,
                "qlora_fidelity": result.manifest.get("qlora_fidelity"),
            },
            sys.stdout,
            indent=2,
            sort_keys=True,
        )
        sys.stdout.write("\n")
    else:
        from mergeq.core.progress import stderr_console

        console = stderr_console()
        console.print(f"merged checkpoint: {result.out} ({len(result.shards)} shard(s), {config.dtype})")
        if result.validation and "mean_kl" in result.validation:
            console.print(
                f"validation: mean KL {result.validation['mean_kl']:.3g}, "
                f"max |delta logit| {result.validation['max_abs_logit_delta']:.3g}"
            )
        qlora = result.manifest.get("qlora") or {}
        if qlora:
            console.print(f"merge target: {qlora['target']} ({qlora['why']})")
        fidelity = result.manifest.get("qlora_fidelity")
        if fidelity:
            console.print(f"merge targets scored on {fidelity['text']['file']} ({fidelity['scored_tokens']} tokens):")
            for label, numbers in fidelity["candidates"].items():
                console.print(
                    f"merge target {label}: mean KL {numbers['mean_kl']:.3g}"
                    + ("  <- chosen" if label == fidelity["chosen"] else "")
                )
    return 0


def register(sub) -> None:
    parser = sub.add_parser("merge", help="merge LoRA/QLoRA adapters into their base (fp16/bf16 safetensors)")
    add_options(parser, MergeConfig)
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.set_defaults(run=run)
