"""What a merge is asked to do: MergeConfig, the one schema of `mergeq merge`'s flags and a pipeline's [merge]
table (mergeq.core.options), and what run_merge takes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergeq.core.options import option

if TYPE_CHECKING:  # merge.qlora imports torch; the CLI reads this schema at start
    from merge.qlora import QuantSettings

QLORA_MODES = ("auto", "nf4", "fp4", "off")  # merge.qlora_detect.decide
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
DTYPES = ("float16", "bfloat16")  # offered at the CLI and in configs; run_merge also writes float32 (tests)
DEFAULT_BLOCKSIZE = 64  # QLoRA's
ADAPTER_KEYS = ("path", "weight")


@dataclass(frozen=True)
class AdapterRef:
    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        """`PATH` or `PATH@WEIGHT` (the CLI form)."""
        path, sep, weight = text.rpartition("@")
        if sep and path:
            try:
                return cls(Path(path), float(weight))
            except ValueError:
                pass
        return cls(Path(text), 1.0)

    @classmethod
    def from_toml(cls, value, path_of: Callable | None) -> AdapterRef:
        """A config's adapter: `"PATH"` or `{path = "PATH", weight = W}` (PATH relative to the config file)."""
        resolve = path_of or (lambda text, **_: Path(text))
        if isinstance(value, str):
            return cls(resolve(value, exists="adapter"))
        if not isinstance(value, dict):
            raise ValueError(f"each adapter is a path or {{path, weight}}, got {value!r}")
        if unknown := sorted(set(value) - set(ADAPTER_KEYS)):
            raise ValueError(f"unknown adapter key {', '.join(unknown)}; allowed keys are {', '.join(ADAPTER_KEYS)}")
        path, weight = value.get("path"), value.get("weight", 1.0)
        if not isinstance(path, str):
            raise ValueError(f"an adapter's path must be a string, got {path!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"an adapter's weight must be a number, got {weight!r}")
        return cls(resolve(path, exists="adapter"), float(weight))


@dataclass(kw_only=True)
class MergeConfig:
    """Everything a merge needs. `base` or `qlora_base` (or both: the fidelity comparison) must be given."""

    base: Path | None = option(
        None,
        exists="base model",
        help="base model folder: fp16/bf16/fp32 safetensors (single or sharded), "
        "a bitsandbytes 4-bit checkpoint, or pytorch_model.bin",
    )
    adapters: Sequence[AdapterRef | tuple[Path, float] | Path | str] = option(
        (),
        flag="--adapter",
        repeat=True,
        required=True,
        metavar="PATH[@WEIGHT]",
        parse=AdapterRef.parse,
        parse_toml=AdapterRef.from_toml,
        help="PEFT adapter folder(s), each with an optional weight; several (--adapter repeated, or a list) are "
        "summed (task arithmetic)",
    )
    out: Path | None = option(
        None, toml=False, required=True, help="output folder (must not exist or be empty)"
    )  # a pipeline sets its own
    dtype: str = option("float16", choices=DTYPES, help="output dtype")
    qlora_base: Path | None = option(
        None,
        exists="QLoRA 4-bit base",
        help="the bitsandbytes 4-bit base the adapter was trained on; with --base, "
        "both merge targets are compared and the closer is used",
    )
    validate: bool = option(
        True,
        flag=None,
        off_flag="--no-validate",
        help="compare the merge with the unmerged PEFT model",
        off_help="skip the comparison with the unmerged PEFT model",
    )
    overwrite: bool = option(False, toml=False, help="replace a non-empty --out")
    verify: bool = option(
        False,
        toml=False,
        help="read and hash every input file for the manifest (default: a digest kept from an earlier merge "
        "or run is trusted while the file's size, times and inode are unchanged; <cache>/stamps/inputs.json)",
    )
    # merge into dequant(quant(base)): the QLoRA target from an fp16 base. Given as nf4|fp4 (the older spelling of
    # --qlora nf4|fp4), made QuantSettings with quant_blocksize and double_quant by __post_init__
    requantize: QuantSettings | str | None = option(
        None,
        toml=False,
        choices=("nf4", "fp4"),
        parse=str,
        help="same as --qlora nf4|fp4, with --quant-blocksize and --no-double-quant taken as given",
    )
    qlora: str = option(
        "auto",
        choices=QLORA_MODES,
        help="the 4-bit base a QLoRA adapter was trained on, rebuilt from the fp16 --base: auto when the adapter "
        "folder shows QLoRA training (recorded base name, trainer config, model card), nf4/fp4 always, off "
        "never",
    )  # merge.qlora_detect
    # with base and qlora_base: the text both merges are measured on (merge.target); a pipeline passes its [eval] text
    eval_text: Path | None = option(
        None,
        flag="--eval-text",
        toml=False,
        text="evaluation",
        help="with --base and --qlora-base: the text both merges are scored on against the trained model "
        "(.txt; .jsonl text/messages; .parquet:COLUMN; `demo`)",
    )
    double_quant: bool | None = option(
        None,
        flag=None,
        off_flag="--no-double-quant",
        toml=False,
        help="the rebuilt 4-bit base without double quantization (default: as the evidence says, else with it)",
    )
    quant_blocksize: int = option(DEFAULT_BLOCKSIZE, toml=False, help="blocksize of the rebuilt 4-bit base")
    max_shard_bytes: int = option(
        DEFAULT_MAX_SHARD_BYTES,
        flag="--max-shard-size",
        toml=False,
        value_type=float,
        unit="GiB",
        scale=1024**3,
        help="output shard size",
    )
    # compute threads while streaming: the merge is memory-bound in cache-sized blocks, where one thread is
    # fastest and never stalls on a busy machine; another core hashes the inputs and runs the validation's
    # reference meanwhile, with the same count. The validation's merged side runs alone after them, on twice
    # the count (merge.merger.alone_threads). Its numbers depend on this option, not on the machine's cores
    threads: int = option(
        1,
        toml=False,
        range=(0, None),
        help="compute threads for the streaming merge and the validation reference beside it; the validation's "
        "merged side, which runs alone after them, uses twice this (0 = torch's default)",
    )
    kl_warn: float = 0.01
    logit_warn: float = 1.0

    def __post_init__(self):
        self.base = Path(self.base) if self.base is not None else None
        self.qlora_base = Path(self.qlora_base) if self.qlora_base is not None else None
        self.out = Path(self.out) if self.out is not None else None
        from merge.qlora import QuantSettings

        with_double = self.double_quant is not False
        if isinstance(self.requantize, str):
            self.requantize = QuantSettings(self.requantize, self.quant_blocksize, with_double)
        elif self.requantize is None and self.quant_blocksize != DEFAULT_BLOCKSIZE and self.qlora in ("nf4", "fp4"):
            self.requantize = QuantSettings(self.qlora, self.quant_blocksize, with_double)

    def adapter_refs(self) -> list[AdapterRef]:
        refs = []
        for item in self.adapters:
            if isinstance(item, AdapterRef):
                refs.append(AdapterRef(Path(item.path), float(item.weight)))
            elif isinstance(item, (tuple, list)):
                refs.append(AdapterRef(Path(item[0]), float(item[1])))
            else:
                refs.append(AdapterRef.parse(str(item)))
        return refs
