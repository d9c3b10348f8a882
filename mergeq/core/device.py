"""The torch device a computation runs on, from the user's --device (cpu, cuda, cuda:N or auto)."""

from __future__ import annotations

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
