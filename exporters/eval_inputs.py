"""What an evaluation starts from: the evaluation text, the reference's tokenizer, the artifact's format (and a
check of its files), and the size facts of an artifact that has no exporter report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from exporters.report import SizeInfo
from mergeq.core.errors import MergeqError
from mergeq.core.modelfiles import read_model_config

INT4_METHODS = ("awq", "gptq", "compressed-tensors")


@dataclass(frozen=True)
class EvalText:
    path: Path
    text: str  # as llama.cpp reads it: the file's UTF-8 text less one trailing newline
    sha256: str  # of the file's bytes
    loaded: object | None = None  # mergeq.core.texts.LoadedText: format, samples, rendering

    def describe(self, tokens: int | None = None) -> dict:
        return (
            self.loaded.describe(tokens) if self.loaded is not None else {"file": str(self.path), "sha256": self.sha256}
        )


def load_text(path: Path | str | None, tokenizer=None) -> EvalText:
    """The evaluation text in any format mergeq.core.texts reads (chat data rendered with `tokenizer`'s template).
    There is no default: the command line or config resolves one (mergeq.textopts.resolve_text_option)."""
    from mergeq.core.texts import FORMATS_HELP
    from mergeq.core.texts import load_text as load_any

    if path is None:
        raise MergeqError(
            f"no evaluation text given ({FORMATS_HELP})",
            hint="pass --eval-text FILE (mergeq export), --text FILE (mergeq eval) or [eval] text "
            "(pipeline config); `demo` names the demo's evaluation text",
        )
    loaded = load_any(path, tokenizer=tokenizer, what="evaluation")
    return EvalText(path=loaded.path, text=loaded.text, sha256=loaded.sha256, loaded=loaded)


def detect_format(artifact: Path) -> str:
    """ "gguf", "int4" (AWQ/GPTQ/compressed-tensors directory) or "hf" (plain checkpoint directory)."""
    artifact = Path(artifact)
    if not artifact.exists():
        raise MergeqError(f"artifact {artifact} does not exist", hint="check the path")
    if artifact.is_file():
        with open(artifact, "rb") as handle:
            magic = handle.read(4)
        if magic == b"GGUF":
            return "gguf"
        raise MergeqError(
            f"artifact {artifact} is a file but not a GGUF file (magic {magic!r})",
            hint="pass a .gguf file or a Hugging Face checkpoint directory",
        )
    config = read_model_config(artifact)
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method is None:
        return "hf"
    if method in INT4_METHODS:
        return "int4"
    raise MergeqError(
        f"artifact {artifact}: quantization method {method!r} cannot be evaluated",
        hint=f"mergeq evaluates plain checkpoints, GGUF files and {', '.join(INT4_METHODS)} directories",
    )


def check_checkpoint(directory: Path) -> None:
    """Validate every safetensors header of a checkpoint (names the file on a truncated or damaged one)."""
    from mergeq.core.safetensors_file import read_safetensors_header

    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files and not any(directory.glob("*.bin")):
        raise MergeqError(f"{directory} holds no weights (*.safetensors or *.bin)", hint="pass a checkpoint directory")
    for path in files:
        read_safetensors_header(path)


def artifact_size(artifact: Path, reference: Path) -> tuple[SizeInfo, str]:
    """Size facts of any artifact and a name for its quantization, for artifacts without an exporter report."""
    from mergeq.core.safetensors_file import read_safetensors_header

    def params_and_bytes(directory: Path) -> tuple[int, int, set[str]]:
        params = size = 0
        dtypes = set()
        for path in sorted(Path(directory).glob("*.safetensors")):
            infos, _ = read_safetensors_header(path)
            params += sum(i.numel for i in infos.values())
            dtypes |= {str(i.dtype).removeprefix("torch.") for i in infos.values() if i.dtype.is_floating_point}
            size += path.stat().st_size
        return params, size, dtypes

    kind = detect_format(artifact)
    if kind == "gguf":
        from exporters.eval_gguf import check_gguf
        from exporters.gguf_inspect import size_info

        summary = check_gguf(artifact)
        info, _ = size_info(summary, artifact.stem, None)
        return info, artifact.stem
    ref_params, _, _ = params_and_bytes(reference)
    params, size, dtypes = params_and_bytes(artifact)
    if kind == "hf":
        names = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}
        quant = "+".join(sorted(names.get(d, d) for d in dtypes)) or "unknown"
        return SizeInfo(size, 2 * params, 8 * size / params if params else float("nan"), None), quant
    q = read_model_config(artifact)["quantization_config"]
    quant = f"w{q.get('bits', '?')}g{q.get('group_size', '?')}"
    return SizeInfo(size, 2 * ref_params, 8 * size / ref_params if ref_params else float("nan"), None), quant


def load_tokenizer(reference: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(reference))
    except Exception as err:
        raise MergeqError(
            f"cannot load the tokenizer of the reference {reference}: {err}",
            hint="the reference must be a Hugging Face checkpoint directory with its tokenizer",
        ) from err
