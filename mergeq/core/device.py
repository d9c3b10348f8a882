"""Where a computation runs: the torch device, from the user's --device (cpu, cuda, cuda:N or auto), and the
number of CPU threads torch uses for it."""

from __future__ import annotations

import contextlib

import torch

from mergeq.core.errors import MergeqError


def resolve_device(name: str) -> torch.device:
    if name != "auto" and name != "cpu" and not name.startswith("cuda"):
        raise MergeqError(f"--device {name!r} is not supported", hint="use cpu, cuda (or cuda:N) or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MergeqError("--device cuda: no CUDA device is available to torch", hint="use --device cpu or auto")
    return torch.device(name)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count for the duration of the block (n <= 0: unchanged), then back to what it was."""
    previous = torch.get_num_threads()
    if n > 0 and n != previous:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
