"""The pinned gguf-py's own GGUFReader view of GGUF files: the oracle that tests compare
exporters.gguf_inspect.read_gguf (mergeq's header parser) with.

`read_with_gguf_py(paths)` runs this file as a script in a subprocess whose `gguf` is the pinned gguf-py
(never the installed package); the script prints one JSON record per file. Slow on large vocabularies:
GGUFReader takes seconds on a 49k-token vocabulary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _probe(paths: list[str]) -> list[dict]:
    """Runs inside the subprocess: its own GGUFReader's view of the files."""
    import gguf
    from gguf import GGUFReader, GGUFValueType

    results = []
    for path in paths:
        reader = GGUFReader(path, "r")
        metadata, arrays = {}, {}
        for name, fld in reader.fields.items():
            if not fld.types or name.startswith("GGUF."):
                continue
            if fld.types[0] == GGUFValueType.ARRAY:
                arrays[name] = len(fld.data)
            else:
                value = fld.contents()
                metadata[name] = value.item() if hasattr(value, "item") else value
        tensors = [
            {
                "name": t.name,
                "type": t.tensor_type.name,
                "shape": [int(d) for d in t.shape],
                "n_elements": int(t.n_elements),
                "n_bytes": int(t.n_bytes),
            }
            for t in reader.tensors
        ]
        results.append(
            {"path": path, "metadata": metadata, "arrays": arrays, "tensors": tensors, "gguf_py": gguf.__file__}
        )
    return results


def read_with_gguf_py(paths: list[Path]) -> list[dict]:
    """The pinned gguf-py GGUFReader's view of the files, from a subprocess."""
    from exporters.llamacpp.layout import pinned_python_env
    from exporters.llamacpp.run import ToolCommand, run_tool
    from exporters.llamacpp.source import ensure_source

    where = ensure_source()
    result = run_tool(
        ToolCommand(
            "gguf-py reader",
            (sys.executable, str(Path(__file__).resolve()), *map(str, paths)),
            env=pinned_python_env(where),
        )
    )
    return json.loads(result.stdout)


if __name__ == "__main__":
    json.dump(_probe(sys.argv[1:]), sys.stdout, default=str)
