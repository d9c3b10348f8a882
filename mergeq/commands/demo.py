"""`mergeq demo-assets [--rebuild] [--json]`: build or refresh the embedded demo assets and show them."""

from __future__ import annotations

import json
from dataclasses import fields

from rich.table import Table

from mergeq.core.progress import stderr_console


def run(args) -> int:
    from mergeq.demo import demo_assets

    assets = demo_assets(rebuild=args.rebuild)
    paths = {f.name: str(getattr(assets, f.name)) for f in fields(assets)}
    facts = assets.facts
    if args.json:
        print(json.dumps({"paths": paths, "facts": facts}, indent=2, sort_keys=True))
        return 0
    table = Table(title="mergeq demo assets")
    table.add_column("asset")
    table.add_column("path")
    for name, path in paths.items():
        table.add_row(name, path)
    console = stderr_console()
    console.print(table)
    ppl = facts.get("adapter", {}).get("perplexity", {})
    if ppl:
        numbers = Table(title="held-out perplexity on texts/eval.txt")
        numbers.add_column("model")
        numbers.add_column("perplexity", justify="right")
        numbers.add_column("tokens", justify="right")
        for name, entry in ppl.items():
            numbers.add_row(name, f"{entry['perplexity']:.3f}", str(entry["scored_tokens"]))
        console.print(numbers)
    return 0


def register(sub) -> None:
    parser = sub.add_parser(
        "demo-assets", help="build (first use) or refresh the embedded demo assets; show paths and perplexities"
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild every demo asset from scratch")
    parser.add_argument("--json", action="store_true", help="print paths and recorded facts as JSON on stdout")
    parser.set_defaults(run=run)
