"""The int4 options: one dataclass the engine takes (Int4Options), and per target the schema of its flags and
TOML keys (GptqOptions, AwqOptions: mergeq.core.options). A field without option metadata is not offered there.
GPTQ and AWQ options are always their target's dataclass, so each setting has one default; a plain Int4Options is
the RTN baseline's (tests and benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mergeq.core.errors import MergeqError
from mergeq.core.options import option
from mergeq.core.texts import FORMATS_HELP

FORMAT_CHOICES = ("native", "compressed-tensors")
ACT_ORDERS = ("static", "none")
SYM_HELP = "symmetric codes, no zero points"
ASYM_HELP = "asymmetric codes with zero points"


@dataclass
class Int4Options:
    method: str  # "gptq", "awq" (or "rtn", the baseline, for tests and benchmarks)
    bits: int = option(4, choices=(4, 8), help="weight bits")
    group_size: int | None = option(
        None,
        help="input columns per scale; -1: per channel",
        default_help="128 if it divides every layer, else 64 or 32",
    )  # None: chosen by plan()
    sym: bool | None = option(None, flag="--sym", off_flag="--asym", help=SYM_HELP, off_help=ASYM_HELP)
    desc_act: bool = False  # GPTQ dynamic activation order (GptqOptions offers it)
    format: str = option(
        "native",
        choices=FORMAT_CHOICES,
        help="checkpoint layout: native (quant_method gptq or awq) or compressed-tensors pack-quantized",
    )
    # resolved at the CLI/config (mergeq.textopts)
    calib: Path | None = option(
        None,
        text="calibration",
        required=True,
        help=f"calibration text, required: {FORMATS_HELP}; `demo` for the demo's text",
    )
    samples: int = option(128, range=(1, None), help="calibration samples")
    seq_len: int = option(512, range=(2, None), help="tokens per calibration sample")
    device: str = option("auto", help="cpu, cuda or auto", default_help="auto: cuda when present")
    exclude: tuple[str, ...] = option(
        (),
        repeat=True,
        metavar="REGEX",
        help="keep the decoder-layer linears whose full name matches in fp16 (Python re, searched in names such "
        "as model.layers.0.mlp.down_proj); repeatable. lm_head and MoE routers stay in fp16 anyway",
    )
    damp_percent: float = 0.01  # GPTQ dampening, a fraction of the mean Hessian diagonal (GptqOptions offers it)
    act_order: str = "static"  # GPTQ without desc_act: "static" or "none" (GptqOptions offers it)

    def __post_init__(self):
        if type(self) is Int4Options and self.method in ("gptq", "awq"):
            raise MergeqError(
                f"{self.method} options are {self.method.capitalize()}Options, whose defaults are "
                f"the {self.method} target's (exporters.int4.options)"
            )

    @property
    def format_name(self) -> str:
        if self.format == "compressed-tensors":
            return "compressed-tensors"
        return "awq" if self.method == "awq" else "gptq"


@dataclass
class GptqOptions(Int4Options):
    """The options of `mergeq export gptq` and of a pipeline's [gptq] table."""

    method: str = field(default="gptq", init=False)
    sym: bool | None = option(
        None, flag="--sym", off_flag="--asym", off_help=ASYM_HELP, help=SYM_HELP + " (default; vLLM's Marlin needs it)"
    )
    desc_act: bool = option(
        False, help="GPTQ dynamic activation order: groups follow it (writes g_idx; Exllama cannot split it)"
    )
    damp_percent: float = option(0.01, help="GPTQ dampening as a fraction of the mean Hessian diagonal")
    act_order: str = option(
        "static",
        choices=ACT_ORDERS,
        help="without --desc-act: process columns by activation order with fixed contiguous "
        "groups (static) or in plain order (none)",
    )


@dataclass
class AwqOptions(Int4Options):
    """The options of `mergeq export awq` and of a pipeline's [awq] table."""

    method: str = field(default="awq", init=False)
    bits: int = option(4, choices=(4,), help="weight bits")
    sym: bool | None = option(None, flag="--sym", off_flag="--asym", help=SYM_HELP, off_help=ASYM_HELP + " (default)")
    samples: int = option(64, range=(1, None), help="calibration samples")
    seq_len: int = option(256, range=(2, None), help="tokens per calibration sample")
