"""Write the hostile-input corpus: every bad input of issue 7, generated from tiny models, into one directory.

    python tests/hostile/make_corpus.py DIR

DIR/shared/ holds the good inputs (a tiny Llama with a SentencePiece tokenizer, a LoRA adapter for it, the merged
checkpoint, texts, a pipeline config); DIR/cases/NAME/ holds each case's bad input, and DIR/cases.json lists the
cases: the mergeq command line to run, the fragments its error must contain (the file, tensor or key), and the
paths that must not exist afterwards. Nothing here is committed: it is rebuilt in seconds.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
for extra in (str(TESTS), str(TESTS.parent)):
    if extra not in sys.path:
        sys.path.insert(0, extra)

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def _tests_conftest():
    """tests/conftest.py by path: under pytest, the name `conftest` may be this folder's own conftest."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mergeq_tests_conftest", TESTS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the other tests' tiny-model builders, reused (never duplicated)
_builders = _tests_conftest()
make_adapter, tiny_gpt2, plain_llama = _builders.make_adapter, _builders.tiny_gpt2, _builders.tiny_llama
from int4_models import tiny_model  # noqa: E402
from test_gguf_export import CORPUS  # noqa: E402
from test_gguf_export import tiny_llama as spm_llama  # noqa: E402
from test_merge_qlora import quantize_checkpoint  # noqa: E402

HIDDEN = 64
PAYLOAD_MARKER = "PAYLOAD_RAN"  # a pickle payload creates this file if it ever runs


# every case build() writes, in order (test_corpus.py parametrizes over these; a test checks the list)
CASE_NAMES = (
    "st-truncated",
    "st-header-past-end",
    "st-header-huge",
    "st-overlap",
    "st-out-of-bounds",
    "st-dtype-shape",
    "st-dtype-bytes",
    "st-non-json",
    "index-missing-shard",
    "index-dotdot",
    "index-absolute",
    "st-adapter-truncated",
    "adapter-wrong-base",
    "adapter-other-architecture",
    "adapter-targets-nothing",
    "adapter-nan",
    "adapter-inf",
    "adapter-unknown-type",
    "adapter-no-config",
    "adapter-pickle-payload",
    "base-pickle-payload",
    "bnb-missing-absmax",
    "bnb-wrong-blocksize",
    "base-fp16-overflow",
    "calib-empty",
    "calib-short",
    "eval-short",
    "group-size-divides-nothing",
    "gguf-unknown-architecture",
    "gguf-unknown-quant",
    "config-unknown-keys",
    "config-wrong-types",
    "config-out-inside-input",
    "config-out-symlink",
    "config-out-through-symlink",
    "config-eval-short",
    "run-corrupt-base",
)


@dataclass
class Case:
    name: str
    group: str  # safetensors, adapter, base, export, config
    argv: list[str]  # mergeq's command line (without the program name)
    expect: list[str]  # fragments the error must contain; "a|b" accepts either
    absent: list[str]  # paths that must not exist afterwards (outputs, payload markers)
    env: dict[str, str] = field(default_factory=dict)
    what: str = ""  # one line for the report


# ------------------------------------------------------------------------------------------ good inputs


def add_fast_tokenizer(folder: Path) -> None:
    """tokenizer.json for a SentencePiece model, so transformers loads it without protobuf; the llama.cpp
    converter keeps reading tokenizer.model."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def pipeline_toml(
    base: Path, adapter: Path, calib: Path, *, gguf: str = '["Q8_0"]', extra: str = "", eval_text: Path | None = None
) -> str:
    evaluation = f'text = "{eval_text}"' if eval_text else "enabled = false"
    return f"""[merge]
base = "{base}"
adapters = [{{path = "{adapter}", weight = 1.0}}]
validate = false

[eval]
{evaluation}

[gguf]
quant = {gguf}

[awq]
group_size = 32
calib = "{calib}"
samples = 4
seq_len = 32

[gptq]
group_size = 32
calib = "{calib}"
samples = 4
seq_len = 32
{extra}"""


def make_shared(root: Path) -> dict[str, Path]:
    from merge.merger import AdapterRef, MergeConfig, run_merge

    shared = root / "shared"
    shared.mkdir(parents=True)
    base = spm_llama(shared / "base", HIDDEN)
    add_fast_tokenizer(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = make_adapter(base, shared / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    merged = shared / "merged"
    run_merge(MergeConfig(base=base, adapters=[AdapterRef(adapter)], out=merged, validate=False))
    calib = shared / "calib.txt"
    calib.write_text(CORPUS)
    (shared / "eval.txt").write_text(CORPUS * 2)
    # the faults' pipeline evaluates every artifact, as a default run does: kills land in evaluations too
    (shared / "run.toml").write_text(pipeline_toml(base, adapter, calib, eval_text=shared / "eval.txt"))
    return {"shared": shared, "base": base, "adapter": adapter, "merged": merged, "calib": calib}


# ------------------------------------------------------------------------------------------ helpers


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_raw(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_raw(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def merge_argv(base: Path, adapter: Path, out: Path, *more: str) -> list[str]:
    return ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--no-validate", *more]


# ------------------------------------------------------------------------------------------ the cases


def safetensors_cases(cases: Path, s: dict) -> list[Case]:
    out: list[Case] = []

    def corrupt(name: str, what: str, edit, expect: list[str]) -> None:
        folder = cases / name
        base = copy_dir(s["base"], folder / "base")
        path = base / "model.safetensors"
        edit(path)
        target = folder / "out"
        out.append(
            Case(
                name,
                "safetensors",
                merge_argv(base, s["adapter"], target),
                [str(path), *expect],
                [str(target)],
                what=what,
            )
        )

    corrupt("st-truncated", "safetensors file cut short", lambda p: p.write_bytes(p.read_bytes()[:-100]), ["truncated"])

    def header_past_end(p: Path) -> None:
        data = p.read_bytes()
        p.write_bytes(struct.pack("<Q", len(data) + 1000) + data[8:])

    corrupt("st-header-past-end", "header length larger than the file", header_past_end, ["runs past the end"])
    # only the 8-byte length claims 200 MB: the file stays small
    corrupt(
        "st-header-huge",
        "header length over 100 MB",
        lambda p: p.write_bytes(struct.pack("<Q", 200 * 1024 * 1024) + p.read_bytes()[8:]),
        ["exceeds the 100 MB limit"],
    )

    def overlap(p: Path) -> None:
        header, body = read_raw(p)
        first, second = by_offset(header)[:2]
        begin = header[first]["data_offsets"][0] + 2
        size = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
        header[second]["data_offsets"] = [begin, begin + size]
        write_raw(p, header, body)

    corrupt("st-overlap", "two tensors' byte ranges overlap", overlap, ["overlap"])

    def out_of_bounds(p: Path) -> None:
        header, body = read_raw(p)
        last = by_offset(header)[-1]
        size = header[last]["data_offsets"][1] - header[last]["data_offsets"][0]
        header[last]["data_offsets"] = [len(body) + 64, len(body) + 64 + size]
        write_raw(p, header, body)

    corrupt("st-out-of-bounds", "a tensor's offsets point past the end of the data", out_of_bounds, ["ends at byte"])

    def shape_mismatch(p: Path) -> None:
        header, body = read_raw(p)
        header["model.layers.0.self_attn.q_proj.weight"]["shape"] = [HIDDEN, HIDDEN + 1]
        write_raw(p, header, body)

    corrupt(
        "st-dtype-shape",
        "dtype and shape disagree with the byte length",
        shape_mismatch,
        ["model.layers.0.self_attn.q_proj.weight", "needs"],
    )

    def wrong_dtype(p: Path) -> None:
        header, body = read_raw(p)
        header["model.norm.weight"]["dtype"] = "F32"
        write_raw(p, header, body)

    corrupt(
        "st-dtype-bytes", "dtype changed: the byte length no longer fits", wrong_dtype, ["model.norm.weight", "needs"]
    )

    def non_json(p: Path) -> None:
        data = bytearray(p.read_bytes())
        data[8] = ord("#")
        p.write_bytes(bytes(data))

    corrupt("st-non-json", "header is not JSON", non_json, ["not valid JSON"])

    # sharded bases: an index that names a missing shard, or a shard outside the folder
    def sharded(name: str, what: str, shard_for_second: str, expect: list[str], stolen: bool = False) -> None:
        folder = cases / name
        base = copy_dir(s["base"], folder / "base")
        names = by_offset(read_raw(base / "model.safetensors")[0])
        first = "model-00001-of-00002.safetensors"
        (base / "model.safetensors").rename(base / first)
        if stolen:
            shutil.copyfile(base / first, folder / "stolen.safetensors")
        second = shard_for_second.replace("{case}", str(folder))
        weight_map = {n: (first if i % 2 == 0 else second) for i, n in enumerate(names)}
        (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        target = folder / "out"
        out.append(
            Case(
                name,
                "safetensors",
                merge_argv(base, s["adapter"], target),
                [str(base / "model.safetensors.index.json"), *expect],
                [str(target)],
                what=what,
            )
        )

    sharded(
        "index-missing-shard",
        "index names a shard that is not there",
        "model-00002-of-00002.safetensors",
        ["model-00002-of-00002.safetensors", "does not exist"],
    )
    sharded(
        "index-dotdot",
        "index shard path with ..",
        "../stolen.safetensors",
        ["../stolen.safetensors", "escapes the checkpoint folder"],
        stolen=True,
    )
    sharded(
        "index-absolute",
        "index shard path is absolute",
        "{case}/stolen.safetensors",
        ["stolen.safetensors", "escapes the checkpoint folder"],
        stolen=True,
    )

    # the adapter's own safetensors file, truncated: the message names the adapter file
    folder = cases / "st-adapter-truncated"
    adapter = copy_dir(s["adapter"], folder / "adapter")
    path = adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-64])
    out.append(
        Case(
            folder.name,
            "safetensors",
            merge_argv(s["base"], adapter, folder / "out"),
            [str(path), "truncated"],
            [str(folder / "out")],
            what="adapter safetensors cut short",
        )
    )
    return out


def pickle_with_payload(path: Path, marker: Path) -> None:
    """A torch pickle that, if unpickled without weights_only, runs code creating `marker`."""

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": Payload()}, path)


def adapter_cases(cases: Path, s: dict) -> list[Case]:
    out: list[Case] = []

    def add(
        name: str, what: str, adapter: Path, expect: list[str], *, base: Path | None = None, absent: list[str] = ()
    ) -> None:
        target = cases / name / "out"
        out.append(
            Case(
                name,
                "adapter",
                merge_argv(base or s["base"], adapter, target),
                expect,
                [str(target), *absent],
                what=what,
            )
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = cases / "adapter-wrong-base"
        other = plain_llama(folder / "other-base", hidden=48, intermediate=96, vocab=320)
        adapter = make_adapter(other, folder / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        add(
            folder.name,
            "adapter trained on a base of other shapes",
            adapter,
            [str(adapter), "shape mismatch", "model.layers.0.self_attn.q_proj"],
        )

        folder = cases / "adapter-other-architecture"
        mistral = tiny_model(
            folder / "mistral-base",
            "mistral",
            hidden=HIDDEN,
            intermediate=2 * HIDDEN,
            heads=2,
            kv_heads=2,
            tokenizer=False,
        )
        adapter = make_adapter(mistral, folder / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        add(
            folder.name,
            "same shapes, adapter's base config is another architecture",
            adapter,
            [str(adapter), "MistralForCausalLM", "LlamaForCausalLM"],
        )

        folder = cases / "adapter-targets-nothing"
        gpt2 = tiny_gpt2(folder / "gpt2-base")
        adapter = make_adapter(
            gpt2, folder / "adapter", r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn"]
        )
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "openai-community/gpt2"  # as downloaded: a hub id, not a local folder
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        add(
            folder.name,
            "target modules match nothing in the base",
            adapter,
            [str(adapter), "match nothing in the base", "c_attn"],
        )

    for name, value in (("adapter-nan", float("nan")), ("adapter-inf", float("inf"))):
        adapter = copy_dir(s["adapter"], cases / name / "adapter")
        path = adapter / "adapter_model.safetensors"
        tensors = load_file(path)
        key = sorted(tensors)[1]
        tensors[key][0, 0] = value
        save_file(tensors, path)
        add(name, f"{'NaN' if value != value else 'Inf'} in an adapter tensor", adapter, ["NaN or Inf", key])

    adapter = copy_dir(s["adapter"], cases / "adapter-unknown-type" / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["peft_type"] = "HYPERLORA"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    add(
        "adapter-unknown-type",
        "unknown PEFT adapter type",
        adapter,
        [str(adapter), "not supported: HYPERLORA", "adapter_config.json"],
    )

    adapter = copy_dir(s["adapter"], cases / "adapter-no-config" / "adapter")
    (adapter / "adapter_config.json").unlink()
    add("adapter-no-config", "adapter_config.json missing", adapter, [str(adapter), "adapter_config.json"])

    folder = cases / "adapter-pickle-payload"
    adapter = folder / "adapter"
    adapter.mkdir(parents=True)
    shutil.copyfile(s["adapter"] / "adapter_config.json", adapter / "adapter_config.json")
    marker = folder / PAYLOAD_MARKER
    pickle_with_payload(adapter / "adapter_model.bin", marker)
    add(
        folder.name,
        "adapter_model.bin pickle whose payload would run code",
        adapter,
        [str(adapter / "adapter_model.bin"), "weights_only=True"],
        absent=[str(marker)],
    )

    folder = cases / "base-pickle-payload"
    base = folder / "base"
    base.mkdir(parents=True)
    for item in s["base"].iterdir():
        if item.name != "model.safetensors":
            shutil.copyfile(item, base / item.name)
    marker = folder / PAYLOAD_MARKER
    pickle_with_payload(base / "pytorch_model.bin", marker)
    add(
        folder.name,
        "base pytorch_model.bin pickle whose payload would run code",
        s["adapter"],
        [str(base / "pytorch_model.bin"), "weights_only=True"],
        base=base,
        absent=[str(marker)],
    )
    return out


def base_cases(cases: Path, s: dict) -> list[Case]:
    out: list[Case] = []
    folder = cases / "bnb-quant-states"
    quantized = quantize_checkpoint(s["base"], folder / "nf4")
    state_name = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"

    def corrupt(name: str, what: str, edit, expect: list[str]) -> None:
        case = cases / name
        q = copy_dir(quantized, case / "nf4")
        path = q / "model.safetensors"
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
        target = case / "out"
        out.append(
            Case(
                name,
                "base",
                [
                    "merge",
                    "--qlora-base",
                    str(q),
                    "--adapter",
                    str(s["adapter"]),
                    "--out",
                    str(target),
                    "--no-validate",
                ],
                ["model.layers.0.mlp.up_proj.weight", *expect],
                [str(target)],
                what=what,
            )
        )

    def set_state(tensors, **changes):
        meta = json.loads(bytes(tensors[state_name].numpy().tobytes()))
        meta.update(changes)
        tensors[state_name] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)

    corrupt(
        "bnb-missing-absmax",
        "4-bit base without absmax",
        lambda t: t.pop("model.layers.0.mlp.up_proj.weight.absmax"),
        ["absmax"],
    )
    corrupt(
        "bnb-wrong-blocksize",
        "4-bit quant state with a wrong blocksize",
        lambda t: set_state(t, blocksize=128),
        ["blocksize"],
    )
    shutil.rmtree(folder)

    name = "base-fp16-overflow"
    base = copy_dir(s["base"], cases / name / "base")
    tensors = {k: v.float() for k, v in load_file(base / "model.safetensors").items()}
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = 70000.0
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    target = cases / name / "out"
    out.append(
        Case(
            name,
            "base",
            merge_argv(base, s["adapter"], target),
            ["model.layers.1.mlp.up_proj.weight", "65504", "--dtype bfloat16"],
            [str(target)],
            what="fp32 base value beyond float16 after the merge",
        )
    )
    return out


def export_cases(cases: Path, s: dict) -> list[Case]:
    out: list[Case] = []
    merged = s["merged"]

    def add(name: str, what: str, argv: list[str], expect: list[str]) -> None:
        target = cases / name / "out"
        (cases / name).mkdir(parents=True, exist_ok=True)
        out.append(
            Case(name, "export", [a.replace("{out}", str(target)) for a in argv], expect, [str(target)], what=what)
        )

    empty = cases / "calib-empty" / "empty.txt"
    empty.parent.mkdir(parents=True)
    empty.write_text("")
    add(
        "calib-empty",
        "empty calibration text",
        [
            "export",
            "awq",
            "--model",
            str(merged),
            "--out",
            "{out}",
            "--no-eval",
            "--calib",
            str(empty),
            "--group-size",
            "32",
        ],
        [str(empty), "no text"],
    )

    short = cases / "calib-short" / "short.txt"
    short.parent.mkdir(parents=True)
    short.write_text("the quick brown fox")
    add(
        "calib-short",
        "calibration text shorter than one sample",
        [
            "export",
            "gptq",
            "--model",
            str(merged),
            "--out",
            "{out}",
            "--no-eval",
            "--calib",
            str(short),
            "--group-size",
            "32",
            "--seq-len",
            "64",
        ],
        [str(short), "fewer than one sample"],
    )

    text = cases / "eval-short" / "eval.txt"
    text.parent.mkdir(parents=True)
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 4)
    add(
        "eval-short",
        "evaluation text shorter than two windows",
        ["export", "gguf", "--model", str(merged), "--out", "{out}", "--quant", "Q8_0", "--eval-text", str(text)],
        [str(text), "fewer than two windows"],
    )

    add(
        "group-size-divides-nothing",
        "int4 group size that divides no layer",
        [
            "export",
            "awq",
            "--model",
            str(merged),
            "--out",
            "{out}",
            "--no-eval",
            "--calib",
            str(s["calib"]),
            "--group-size",
            "48",
        ],
        ["48", "group"],
    )

    model = copy_dir(merged, cases / "gguf-unknown-architecture" / "model")
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["QuuxForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    add(
        "gguf-unknown-architecture",
        "architecture the GGUF converter does not know",
        ["export", "gguf", "--model", str(model), "--out", "{out}", "--no-eval", "--quant", "Q8_0"],
        ["QuuxForCausalLM", str(model / "config.json")],
    )

    add(
        "gguf-unknown-quant",
        "unknown quantization type",
        ["export", "gguf", "--model", str(merged), "--out", "{out}", "--no-eval", "--quant", "Q3_FANCY"],
        ["Q3_FANCY"],
    )
    return out


def config_cases(cases: Path, s: dict) -> list[Case]:
    out: list[Case] = []
    good = pipeline_toml(s["base"], s["adapter"], s["calib"])

    def add(name: str, what: str, text: str, expect: list[str], target: Path | None = None) -> Path:
        folder = cases / name
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "run.toml"
        config.write_text(text)
        existed = target is not None and (target.exists() or target.is_symlink())
        target = target or folder / "out"
        out.append(
            Case(
                name,
                "config",
                ["run", str(config), "--out", str(target)],
                expect,
                [] if existed else [str(target)],
                what=what,
            )
        )
        return folder

    add(
        "config-unknown-keys",
        "unknown keys in the config",
        good.replace("validate = false", 'validate = false\ncolour = "red"').replace(
            'quant = ["Q8_0"]', 'quant = ["Q8_0"]\nturbo = true'
        ),
        ["run.toml:5: [merge] colour: unknown key", "[gguf] turbo"],
    )
    add(
        "config-wrong-types",
        "wrong value types in the config",
        good.replace("validate = false", 'validate = "no"').replace("samples = 4", 'samples = "four"', 1),
        ["run.toml:4: [merge] validate: expected bool", "four"],
    )
    add(
        "config-out-inside-input",
        "output directory inside an input",
        good,
        ["inside the input", str(s["base"])],
        target=s["base"] / "out",
    )
    folder = cases / "config-out-symlink"
    folder.mkdir()
    elsewhere = folder / "elsewhere"
    elsewhere.mkdir()
    (folder / "link").symlink_to(elsewhere, target_is_directory=True)
    add(
        folder.name,
        "output directory is a symlink to somewhere else",
        good,
        ["symlink", str(folder / "link")],
        target=folder / "link",
    )
    folder = cases / "config-out-through-symlink"
    folder.mkdir()
    (folder / "results").symlink_to(s["adapter"], target_is_directory=True)
    add(
        folder.name,
        "output path escapes through a symlink into an input",
        good,
        ["symlink|inside the input", str(folder / "results" / "run1")],
        target=folder / "results" / "run1",
    )
    short = cases / "config-eval-short" / "eval.txt"
    short.parent.mkdir(parents=True)
    short.write_text("the quick brown fox jumps over the lazy dog\n" * 4)
    add(
        "config-eval-short",
        "pipeline evaluation text shorter than two windows",
        good.replace("enabled = false", f'text = "{short}"'),
        [str(short), "fewer than two windows"],
    )
    folder = cases / "run-corrupt-base"
    base = copy_dir(s["base"], folder / "base")
    (base / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:-100])
    add(
        folder.name,
        "pipeline on a truncated base",
        pipeline_toml(base, s["adapter"], s["calib"]),
        [str(base / "model.safetensors"), "truncated"],
    )
    return out


def build(root: Path) -> list[Case]:
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    s = make_shared(root)
    cases = root / "cases"
    cases.mkdir()
    found = []
    for group in (safetensors_cases, adapter_cases, base_cases, export_cases, config_cases):
        found += group(cases, s)
    names = [c.name for c in found]
    assert len(names) == len(set(names)), names
    (root / "cases.json").write_text(json.dumps([asdict(c) for c in found], indent=2) + "\n")
    return found


def load(root: Path) -> list[Case]:
    return [Case(**c) for c in json.loads((Path(root) / "cases.json").read_text())]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    built = build(Path(sys.argv[1]))
    print(f"{len(built)} cases in {sys.argv[1]}")
