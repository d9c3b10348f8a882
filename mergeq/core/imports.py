"""Importing the large libraries validation runs on (PEFT, and bitsandbytes, which PEFT imports whenever it is
installed) at their cost and no more.

bitsandbytes wraps four of its CPU kernels in `torch.compile` when it is imported. That call alone imports
torch's inductor compiler: measured on the 1.1B merge bench, 0.6 s of wall time and 35 to 50 MB of resident
memory, on every merge, for kernels that a merge of an fp16 base never runs. `peft_imported()` imports
bitsandbytes with `torch.compile` standing aside, so those four kernels stay plain eager functions. bitsandbytes
falls back to the same functions itself whenever compiling fails, so this is a path it supports. (For the
moment of that import, `torch.compile` is the identity for the whole process: mergeq compiles nothing.) It also drops
bitsandbytes' warning that an optional hub kernel (`kernels-community`) is not installed: that kernel is only a
faster 4-bit matmul, and a user can do nothing about the warning inside mergeq."""

from __future__ import annotations

import importlib.util
import logging
import threading

from mergeq.core.memory import collector_paused

_lock = threading.Lock()

BNB_OPTIONAL_KERNEL = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropOptionalKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BNB_OPTIONAL_KERNEL)


def _eager(model=None, **_options):
    """torch.compile's signature, compiling nothing: the function itself (or a decorator returning it)."""
    return model if model is not None else (lambda fn: fn)


def _import_bitsandbytes_eagerly() -> None:
    import sys

    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    import torch

    compile_ = torch.compile
    quiet = _DropOptionalKernelWarning()
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    cpu_ops.addFilter(quiet)
    torch.compile = _eager
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001  (a broken install: PEFT imports it again and reports or ignores it)
        pass
    finally:
        torch.compile = compile_
        cpu_ops.removeFilter(quiet)


def peft_imported() -> None:
    """Import PEFT and transformers (and bitsandbytes as above), with the garbage collector paused
    (collector_paused). Cheap once done; safe from any thread."""
    with _lock, collector_paused():
        _import_bitsandbytes_eagerly()
        import peft  # noqa: F401
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401
