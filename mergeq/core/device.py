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
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise MergeqError(f"--device {name!r} is not a device torch knows: {exc}", hint="use cuda or cuda:N") from exc
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.index is not None and device.index >= count:
        raise MergeqError(
            f"--device {name}: torch sees {count} CUDA device(s), numbered from 0",
            hint="use --device cuda (the first one), or a number below the count (CUDA_VISIBLE_DEVICES renumbers them)",
        )
    return device


def to_fp32_on(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` in float32 on `device`: moved first, then converted there. A blocking host-to-GPU copy that also
    changes the dtype converts on the host (torch's copy), which makes an fp32 copy in host memory and sends twice
    a 16-bit tensor's bytes; this way a 16-bit tensor crosses at its own size. On the CPU: one conversion, as
    before."""
    return tensor.to(device).to(torch.float32)


def arithmetic_key() -> dict:
    """What, besides its inputs, options and device, decides the bytes of a float computation on this machine:
    torch's thread count (it splits the sums) and the CPU kernels torch dispatches to (GPTQ wrote other bytes
    with ATEN_CPU_CAPABILITY=default than with the machine's AVX2 kernels; README "Known limits")."""
    return {"torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


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
