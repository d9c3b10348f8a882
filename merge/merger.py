"""The streaming merge: adapters + base -> one fp16/bf16 checkpoint, one tensor at a time.

`run_merge` ties the pieces together: check the output folder, decide the QLoRA target (merge.qlora_detect),
open each base with the adapters planned against it (merge/source.py, merge/plan.py, merge/ops.py), choose
between two bases by measurement when both are given (merge/target.py), stream the merge into shards
(merge/streaming.py), validate against PEFT's unmerged model (merge/validate.py), then write config.json, the
tokenizer files and merge_manifest.json (merge/manifest.py).

Two threads work beside the merge: one hashes the inputs for the manifest (from the start, beside the imports
and checks before the merge too), one computes the validation reference's logits (they do not depend on the
merged files); only the merged side of the validation runs after the merge, alone, on the cores the merge and
the reference used side by side (twice --threads). Both threads drop the GIL in their heavy parts (hashlib,
torch), so with a free core the reference costs little wall time (1.1B bench, 2 cores shared with other work at
load 5, best of two: 18.1 s wall for the default merge, 25.1 s with the reference after the merge; about the same
CPU time, 15-16 s).

Everything is written into a temporary sibling of --out and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge import manifest as manifest_mod
from merge.adapters import describe_adapter, read_config
from merge.digests import InputDigests, input_folders
from merge.options import AdapterRef, MergeConfig
from merge.qlora import TORCH_DTYPES, QuantSettings, check_quantization_config
from merge.qlora_detect import Decision, adapter_evidence, decide, user_base_evidence
from merge.source import Source
from merge.streaming import merged_vocab, stream_merge
from mergeq.core.atomic import atomic_dir, write_json
from mergeq.core.device import torch_threads
from mergeq.core.errors import MergeqError
from mergeq.core.modelfiles import copy_aux_files, read_model_config

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    out: Path
    manifest: dict
    warnings: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    validation: dict | None = None


# ----------------------------------------------------------------------------------------------- output checks


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or child.is_relative_to(parent)


def check_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    out_r = Path(out).resolve()
    for source in inputs:
        src = Path(source).resolve()
        if _inside(out_r, src):
            raise MergeqError(
                f"output directory {out} is inside the input {source}",
                hint="choose an --out directory outside every input folder",
            )
        if _inside(src, out_r):
            raise MergeqError(
                f"input {source} is inside the output directory {out}",
                hint="choose an --out directory that holds no input",
            )
    if out_r.exists():
        if not out_r.is_dir():
            raise MergeqError(f"output {out} exists and is not a directory", hint="choose another --out")
        if any(out_r.iterdir()) and not overwrite:
            raise MergeqError(
                f"output directory {out} exists and is not empty",
                hint="choose a new --out, or pass --overwrite to replace it",
            )


def _write_config(source: Source, folder: Path, facts: dict, dtype_name: str) -> dict:
    config = json.loads(json.dumps(source.config))
    config.pop("quantization_config", None)
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    if facts["vocab_size"] is not None and config.get("vocab_size") not in (None, facts["vocab_size"]):
        config["vocab_size"] = facts["vocab_size"]
    if source.info.tied and not facts["tied"]:
        config["tie_word_embeddings"] = False
    write_json(folder / "config.json", config)
    return config


def _created_parents(out: Path) -> list[Path]:
    missing = []
    parent = Path(out).resolve().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


def run_merge(config: MergeConfig, digests: InputDigests | None = None) -> MergeResult:
    """Merge, validate and write `config.out` atomically; on any error nothing is left behind. `digests`: the
    inputs' digests already started (`mergeq merge` starts them before importing torch); used if they are for
    these inputs. The caller stops them if this fails before using them."""
    if config.out is None:
        raise MergeqError("no output folder given", hint="pass --out DIR")
    refs = config.adapter_refs()
    if not refs:
        raise MergeqError("no adapter given", hint="pass --adapter PATH (several allowed, PATH@WEIGHT to weight)")
    if config.dtype not in TORCH_DTYPES:
        raise MergeqError(f"--dtype {config.dtype!r} is not one of float16, bfloat16")
    if config.base is None and config.qlora_base is None:
        raise MergeqError("no base given", hint="pass --base (fp16/bf16 or bitsandbytes 4-bit) and/or --qlora-base")
    out = Path(config.out)
    inputs = [Path(p) for p in (config.base, config.qlora_base) if p is not None] + [r.path for r in refs]
    check_output(out, inputs, config.overwrite)
    created = _created_parents(out)
    try:
        # one thread count for all of it (--threads): the merge, its validation, the target choice, and the checks
        # before them. On a busy machine one thread is fastest (measured on a 1.1B Llama, 2 shared cores: the
        # default merge cost 43 CPU s with torch's 2 threads, 25 with one), and the validation numbers no longer
        # depend on the core count. Set before the first torch operation: a second OpenMP thread, once started
        # (by the adapter's finiteness check), spun 1.5 CPU s waiting for work
        with torch_threads(config.threads):
            return _run(config, refs, out, digests)
    except BaseException:
        for folder in created:  # parents made for the output; removed only if still empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def alone_threads(threads: int) -> int:
    """torch threads for the merged side of the validation, which runs after the merge and the reference, on
    its own: the cores those two used side by side, `threads` each (0: torch's default, unchanged). Measured on
    the 1.1B bench, 2 cores: 2.1 s on one thread, 1.25 s on two. A fixed multiple of --threads, so the numbers
    depend on the option, never on the machine's core count."""
    return 2 * threads if threads > 0 else 0


def _is_4bit_folder(folder: Path) -> bool:
    config = read_model_config(folder)
    return check_quantization_config(config, folder) == "bnb-4bit"


def qlora_decision(config: MergeConfig, refs: list[AdapterRef]) -> Decision:
    """Which base the adapters are merged into: the evidence of QLoRA training and --qlora (merge.qlora_detect)."""
    evidence = []
    for ref in refs:
        if Path(ref.path).is_dir():
            evidence += adapter_evidence(ref.path, read_config(ref.path))
    given = None
    if config.qlora_base is not None:
        given = (Path(config.qlora_base), "--qlora-base")
    elif config.base is not None and _is_4bit_folder(Path(config.base)):
        given = (Path(config.base), "--base")
    if given is not None:
        evidence.append(user_base_evidence(given[0], None, given[1]))
    if config.requantize is not None and given is None:
        s = config.requantize
        return Decision(
            "explicit",
            True,
            s,
            f"fp16 base requantized to {s.quant_type}" + (" (double quant)" if s.double_quant else ""),
            evidence,
            [],
            "quantization settings given explicitly (--requantize)",
        )
    return decide(config.qlora, evidence, has_4bit_base=given is not None, double_quant=config.double_quant)


def _run(config: MergeConfig, refs: list[AdapterRef], out: Path, digests: InputDigests | None) -> MergeResult:
    out_dtype = TORCH_DTYPES[config.dtype]
    decision = qlora_decision(config, refs)
    log.info("merge target: %s (%s)", decision.target, decision.why)  # its warnings are logged with the others
    requantize = decision.settings if config.qlora_base is None else None
    candidates: list[tuple[str, Path, QuantSettings | None]] = []
    if config.qlora_base is not None:
        candidates.append(("qlora-base", Path(config.qlora_base), None))
    if config.base is not None:
        candidates.append(("base", Path(config.base), requantize))
    # input hashes for the manifest, read in a background thread from the start (hashlib drops the GIL): beside
    # the imports and checks before the merge, which run on one core, and beside the merge; `mergeq merge` starts
    # them before it imports torch (merge.digests). Stopped, not waited for, when anything fails
    folders = input_folders([config.qlora_base, config.base], [r.path for r in refs])
    if digests is None or not digests.serves(folders, config.verify):
        if digests is not None:
            digests.stop()
        digests = InputDigests(folders, verify=config.verify)
    sources: list[Source] = []
    try:
        for label, folder, requant in candidates:
            sources.append(Source(folder, label, refs, out_dtype, requant))
        for adapter in sources[0].adapters:
            adapter.check_finite()
    except BaseException:
        digests.stop()
        for source in sources:
            source.close()
        raise
    warnings: list[str] = [f"QLoRA: {w}" for w in decision.warnings]
    recorded = {a.config.get("base_model_name_or_path") for a in sources[0].adapters} - {None, ""}
    if len(recorded) > 1:
        warnings.append(
            "the adapters record different bases ("
            + ", ".join(sorted(map(str, recorded)))
            + "); their shapes fit this base, but task arithmetic assumes one shared base"
        )
    result_validation = None
    fidelity = None
    try:
        exists_empty = out.exists()
        with (
            atomic_dir(out, overwrite=config.overwrite or exists_empty) as tmp,
            _reference_beside(config, refs, sources, requantize) as reference_side,
        ):
            chosen = sources[0]
            if len(sources) > 1:  # measured before anything is written; only the chosen merge is written
                choice = _choose(config, refs, sources)
                fidelity = choice.describe()
                warnings.extend(choice.warnings)
                chosen = next(s for s in sources if s.label == choice.chosen)
            facts = {chosen.label: stream_merge(chosen, tmp, config.max_shard_bytes)}
            _write_config(chosen, tmp, facts[chosen.label], config.dtype)
            for source in sources:  # unmap what the merge read (file pages it left mapped: 54 MB on the 1.1B bench)
                source.close()  # before validation; the files reopen if read again
            if config.validate:
                from merge import validate as validate_mod

                side = reference_side.result() if reference_side is not None else None
                with torch_threads(alone_threads(config.threads)):  # nothing else runs now
                    outcome = validate_mod.compare_candidates(
                        _reference(config, refs, chosen, requantize),
                        {chosen.label: tmp},
                        config.kl_warn,
                        config.logit_warn,
                        side=side,
                    )
                warnings.extend(outcome.warnings)
                result_validation = outcome.results[chosen.label]
            else:
                warnings.append("validation skipped (--no-validate)")
            chosen_facts = facts[chosen.label]
            aux = copy_aux_files(
                [Path(p) for p in (config.base, config.qlora_base) if p is not None],
                tmp,
                tokenizer_from=[r.path for r in refs],
            )
            for source in sources:
                warnings.extend(source.warnings)
            manifest = manifest_mod.build(
                config=config,
                chosen=chosen,
                sources=sources,
                facts=chosen_facts,
                aux=aux,
                adapters=[describe_adapter(a) for a in chosen.adapters],
                validation=result_validation,
                fidelity=fidelity,
                warnings=warnings,
                qlora=decision.describe(),
                hashes=digests.result(),
            )
            write_json(tmp / manifest_mod.MANIFEST_NAME, manifest)
    finally:
        digests.stop()  # done by now unless the merge failed
        for source in sources:
            source.close()
    digests.save()
    for warning in warnings:
        log.warning("%s", warning)
    return MergeResult(
        out=out, manifest=manifest, warnings=warnings, shards=chosen_facts["shards"], validation=result_validation
    )


def _reference(config: MergeConfig, refs: list[AdapterRef], chosen: Source, requantize: QuantSettings | None):
    """What validation compares the merge with: the adapters unmerged on the base they were trained on."""
    from merge import validate as validate_mod

    return validate_mod.Reference(
        base=Path(config.qlora_base) if config.qlora_base else Path(config.base),
        adapters=refs,
        vocab_size=merged_vocab(chosen),
        tokenizer_dirs=_tokenizer_dirs(config, refs),
        quantize=None if config.qlora_base else requantize,
    )


@contextlib.contextmanager
def _reference_beside(config: MergeConfig, refs: list[AdapterRef], sources: list[Source], requantize):
    """The validation reference's logits computed in a thread while the merge streams (they do not depend on the
    merged files; torch drops the GIL, so the two use two cores): yields its Future, or None when validation
    does not run or runs otherwise (off, skipped for these adapters, or choosing between two bases). On exit
    the thread is stopped at its next layer and waited for: nothing runs on after the merge returns or fails."""
    from merge import validate as validate_mod

    if not config.validate or len(sources) != 1 or validate_mod.reference_skip_reason(refs) is not None:
        yield None
        return
    reference = _reference(config, refs, sources[0], requantize)
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeq-reference")
    try:
        yield pool.submit(validate_mod.reference_side, reference, stop=stop)
    finally:
        stop.set()
        pool.shutdown(wait=True)


def _tokenizer_dirs(config: MergeConfig, refs: list[AdapterRef]) -> list[Path]:
    return [r.path for r in refs] + [Path(p) for p in (config.base, config.qlora_base) if p]


def _choose(config: MergeConfig, refs: list[AdapterRef], sources: list[Source]):
    """Both an fp16 and a 4-bit base: score both merges against the trained model on the evaluation text."""
    from merge.target import choose_target

    if config.eval_text is None:
        raise MergeqError(
            "--base and --qlora-base: the merge target is chosen by measuring both merges against "
            "the trained model on an evaluation text, and none was given",
            hint="pass --eval-text FILE (text like what the model will see in use; .txt, .jsonl, "
            ".parquet:COLUMN), or pass only one base",
        )
    reference = Source(Path(config.qlora_base), "reference", refs, torch.float32, None)
    try:
        return choose_target(sources, reference, Path(config.eval_text), _tokenizer_dirs(config, refs))
    finally:
        reference.close()
