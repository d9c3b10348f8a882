"""EvalOptions: what the evaluator scores and how (light to import: the CLI builds its flags at start)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergeq.core.options import option
from mergeq.core.paths import cache_root
from mergeq.core.texts import FORMATS_HELP


@dataclass(frozen=True)
class EvalOptions:
    """What to score and how: the options of `mergeq eval`, the evaluation options of `mergeq export` and a
    pipeline's [eval] table (mergeq.core.options). The defaults fit one demo artifact in under a minute on 2 cores.
    The library takes the text and reference as explicit arguments; these fields carry them from the edge."""

    text: Path | None = option(
        None,
        flag="--eval-text",
        text="evaluation",
        required=True,
        help=f"evaluation text, required when evaluating: {FORMATS_HELP}; `demo` for the demo's text",
    )  # resolved at the CLI/config (mergeq.textopts)
    enabled: bool = option(True, flag=None, off_flag="--no-eval", help="skip perplexity/KL evaluation")
    reference: Path | None = option(
        None, toml=False, default_help="the artifact's own --model", help="fp16 checkpoint to compare with"
    )  # a pipeline compares with its merge
    # the pipeline scores every artifact with these defaults: not TOML keys, so its stage keys need not hold them
    n_ctx: int = option(
        512, toml=False, range=(2, None), unit="tokens", help="tokens per window (llama-perplexity's -c)"
    )
    max_windows: int = option(16, flag="--windows", toml=False, range=(1, None), help="most windows to score")
    device: str = option(
        "cpu", toml=False, help="where the layer-by-layer forward passes run: cpu, cuda, cuda:N or auto"
    )
    batch_windows: int = 1  # windows per torch forward pass
    threads: int | None = None  # llama.cpp threads (default: all cores)
    cache_dir: Path | None = None  # reference cache (default: cache_root()/eval)
    streaming: bool = True  # one decoder layer in memory at a time (False: the whole model, the old reference path)

    def resolved_cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else cache_root() / "eval"
