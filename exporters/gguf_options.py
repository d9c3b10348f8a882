"""The options of the `gguf` exporter (`mergeq export gguf` and a pipeline's [gguf] table): one dataclass, the
only schema of its flags and TOML keys (mergeq.core.options); checked() makes the quant types canonical against the
pinned llama.cpp and the imatrix and size-budget options consistent."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from exporters.llamacpp.pin import canonical_quant_type, load_pin
from mergeq.core.errors import MergeqError
from mergeq.core.options import OptionError, option

DEFAULT_QUANTS = ("Q8_0", "Q4_K_M")
INTERMEDIATES = ("f16", "bf16")
FLOAT_TYPES = {"F16": "f16", "BF16": "bf16"}  # the --quant types an intermediate can itself be


@dataclass(frozen=True)
class GGUFOptions:
    """The options of `mergeq export gguf` and of a pipeline's [gguf] table (mergeq.core.options)."""

    quants: tuple[str, ...] = option(
        DEFAULT_QUANTS,
        flag="--quant",
        key="quant",
        repeat=True,
        metavar="TYPE",
        help="llama-quantize type to write (repeatable or comma-separated): Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, "
        "IQ4_XS, ..., F16, BF16",
    )  # after checked(): llama-quantize spellings, request order, no duplicates
    imatrix: bool = option(False, help="quantize with an importance matrix computed by llama-imatrix from --calib")
    calib: Path | None = option(None, metavar="FILE", help="calibration text for --imatrix")
    imatrix_ctx: int = option(
        512,
        metavar="N",
        range=(8, None),
        help="llama-imatrix context (tokens per chunk; the text needs at least 2N tokens)",
    )
    intermediate: str = option(
        "auto",
        choices=("auto", *INTERMEDIATES),
        help="type of the one intermediate GGUF (auto: bf16 for bfloat16 checkpoints, else f16)",
    )
    threads: int | None = option(None, metavar="N", range=(1, None), default_help="all cores", help="llama.cpp threads")
    # size budgets (exporters/gguf_budget): after checked(), every one in `targets` as "2.5GB", "4.5bpw" or
    # "like:Q4_K_M"; each makes one more GGUF, OUT/MIX-.../, with the least predicted divergence at that size
    targets: tuple[str, ...] = option(
        (),
        flag="--target",
        key="target",
        repeat=True,
        metavar="SIZE|like:TYPE",
        help="a GGUF that fits this size, its types chosen tensor by tensor from measurements (needs --imatrix "
        "--calib): a file size (2.5GB, 700MiB), bits per weight (4.5bpw) or like:TYPE (the size of that "
        "named mix, e.g. like:Q4_K_M); repeatable",
    )
    target_size: str | None = option(
        None, metavar="SIZE", toml=False, help="the same as --target SIZE: a file size such as 2.5GB or 700MiB"
    )
    target_bpw: float | None = option(
        None,
        metavar="BITS",
        range=(1.0, 16.0),
        toml=False,
        help="the same as --target BITSbpw: bits per weight over the whole file",
    )

    def checked(self) -> GGUFOptions:
        """The quant types canonical (llama-quantize's spelling, comma lists split, no duplicates), and the
        imatrix options consistent."""
        requested = [part.strip() for value in self.quants for part in str(value).split(",") if part.strip()]
        quants: list[str] = []
        pin = load_pin()
        for name in requested:
            canonical = canonical_quant_type(name, pin)
            if canonical is None or canonical == "COPY":
                known = ", ".join(t for t in pin.quant_types if t != "COPY")
                raise OptionError(
                    "quants",
                    f"--quant {name!r} is not a llama-quantize type",
                    hint=f"llama.cpp {pin.commit} (llama-cpp-python {pin.version}) knows: {known}",
                )
            if canonical not in quants:
                quants.append(canonical)
        if self.imatrix and self.calib is None:
            raise OptionError(
                "calib", "--imatrix needs --calib FILE: the text that llama-imatrix runs through the model"
            )
        if self.calib is not None and not self.imatrix:
            raise OptionError("calib", "--calib is only used with --imatrix", hint="add --imatrix, or drop --calib")
        if not self.imatrix and (need := [q for q in quants if q in pin.needs_imatrix]):
            raise OptionError(
                "quants",
                f"--quant {', '.join(need)} requires an importance matrix",
                hint="add --imatrix --calib FILE, or choose e.g. IQ4_XS, Q3_K_M or Q4_K_M",
            )
        targets = list(self.targets)
        if self.target_size is not None:
            targets.append(self.target_size)
        if self.target_bpw is not None:
            targets.append(f"{self.target_bpw:g}bpw")
        if targets:
            from exporters.gguf_budget.target import check_targets

            try:
                check_targets(tuple(targets), self.imatrix, pin.quant_types)
            except MergeqError as err:
                raise OptionError("targets", str(err.args[0]), hint=err.hint) from None
        return replace(self, quants=tuple(quants), targets=tuple(targets), target_size=None, target_bpw=None)
