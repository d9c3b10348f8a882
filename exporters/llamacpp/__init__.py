"""The pinned llama.cpp: fetched as a PyPI sdist, verified, built once into the cache, run with clear errors.

The pin lives in third_party/llama.cpp.toml (package, version, sha256, the llama.cpp commit it carries,
cmake arguments, the quantization type names). Layout under `cache_root()/llama.cpp/<version>/`:

    download/<sdist>   the verified source distribution (kept, so a rebuild needs no network)
    src/               its vendor/llama.cpp tree: convert_hf_to_gguf.py, conversion/, gguf-py/, tools/
    build/             the cmake build tree, one for both variants: the instruction set reaches only ggml's
                       CPU backend, so switching variants recompiles that library and relinks
    bin/               llama-quantize, llama-perplexity, llama-imatrix, llama-server
    build.json         written last: the stamp that says the build above is complete, for which pin and CPU,
                       which variant it is and why, and that it passed the smoke test

A build proves itself before it is stamped: `smoke.smoke_test` makes a tiny GGUF on the spot (`tiny.py`, run
under the pinned gguf-py) and runs every tool on it (quantize to Q8_0, perplexity, imatrix; --version for the
others). The "native" variant (-march=native) is tried first; if a tool dies by a signal there, the tree is
built once more as "portable" (the CPU's own extensions named one by one, AMX off) and that is used if it
passes.

Setup runs under an exclusive file lock (`<version>.lock` next to that directory), so concurrent mergeq
processes build once; a complete stamp means nothing is rebuilt. Every tool runs through `run.run_tool`,
which turns a failure into ToolError naming the tool and quoting its last output lines.

One module per job; import from the one you need:

    pin       third_party/llama.cpp.toml as a `Pin`; quantization type names; version_info for provenance
    layout    the cache directory of a pin, its setup lock, its build stamp, the pinned gguf-py environment
    run       running an external tool: ToolCommand, run_tool, process groups, what a signal means
    source    fetch, verify and extract the pinned sdist (ensure_source)
    build     the cmake build, its variants (native, portable) and tools; ensure_built, tool_command
    smoke     the smoke test every build passes before it is stamped (and that `mergeq doctor` re-runs)
    tiny      the smoke test's tiny GGUF, a script run under the pinned gguf-py
    convert   the pinned convert_hf_to_gguf.py: its command, and the architectures it converts
    server    llama-server as a managed process on loopback (the chat template round trip uses it)
    doctor    the rows `mergeq doctor` shows for llama.cpp
"""
