"""--device: what is refused before any work (a CUDA device the machine does not have), and the fp32 transfer."""

from __future__ import annotations

import pytest
import torch

from mergeq.core import device
from mergeq.core.errors import MergeqError


def test_a_cuda_device_number_the_machine_lacks_is_refused_up_front(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device.resolve_device("cuda") == torch.device("cuda")
    assert device.resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(MergeqError, match=r"--device cuda:1: torch sees 1 CUDA device\(s\)"):
        device.resolve_device("cuda:1")
    with pytest.raises(MergeqError, match="is not a device torch knows"):
        device.resolve_device("cuda:first")
    with pytest.raises(MergeqError, match="is not supported"):
        device.resolve_device("tpu")


def test_no_cuda_at_all_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(MergeqError, match="no CUDA device is available"):
        device.resolve_device("cuda:0")


def test_to_fp32_on_gives_the_same_values_as_one_conversion():
    half = torch.randn(64, 32).to(torch.bfloat16)
    out = device.to_fp32_on(half, "cpu")
    assert out.dtype == torch.float32 and torch.equal(out, half.to(torch.float32))
