"""The int4 math and formats: packing layouts against the specs, round trips, GPTQ and AWQ against RTN."""

from __future__ import annotations

import pytest
import torch

from exporters.int4 import awq
from exporters.int4.formats import AWQ_ORDER, FORMATS
from exporters.int4.gptq import _inverse_cholesky_upper_, _prepared, accumulate, gptq_quantize
from exporters.int4.quant import QuantScheme, pack_first, pack_last, rtn_quantize, unpack_first, unpack_last
from mergeq.core.errors import MergeqError


def test_pack_unpack_round_trip_both_dimensions_and_awq_order():
    codes = torch.randint(0, 16, (24, 64))
    assert torch.equal(unpack_last(pack_last(codes, 4), 4), codes)
    assert torch.equal(unpack_first(pack_first(codes, 4), 4), codes)
    assert torch.equal(unpack_last(pack_last(codes, 4, AWQ_ORDER), 4, AWQ_ORDER), codes)
    codes8 = torch.randint(0, 256, (8, 16))
    assert torch.equal(unpack_last(pack_last(codes8, 8), 8), codes8)


def _ramp_linear(scheme: QuantScheme):
    """A quantized linear whose codes are j % 8 along both dimensions, to read the words of each layout."""
    out_f, in_f = 16, 64
    q = rtn_quantize(torch.randn(out_f, in_f), scheme)
    ramp = (torch.arange(out_f)[:, None] + torch.arange(in_f)[None, :]) % 8
    q.codes = ramp.to(torch.uint8)
    return q


def test_gptq_layout_matches_the_autogptq_v1_spec():
    scheme = QuantScheme(4, 32, sym=True)
    q = _ramp_linear(scheme)
    t = FORMATS["gptq"].linear_tensors("m", q, scheme, desc_act=False)
    assert t["m.qweight"].dtype == torch.int32 and t["m.qweight"].shape == (64 // 8, 16)
    # row 0 of the output dimension holds input codes 0..7, lowest nibble first
    assert t["m.qweight"][0, 0].item() == 0x76543210
    # symmetric zero point 8 is stored as 8 - 1 = 7 in every nibble
    assert t["m.qzeros"].shape == (2, 16 // 8) and (t["m.qzeros"] == 0x77777777).all()
    assert t["m.scales"].dtype == torch.float16 and t["m.scales"].shape == (2, 16)
    assert torch.equal(t["m.g_idx"], torch.arange(64, dtype=torch.int32) // 32)


def test_awq_layout_matches_the_autoawq_gemm_spec():
    scheme = QuantScheme(4, 32, sym=False)
    q = _ramp_linear(scheme)
    t = FORMATS["awq"].linear_tensors("m", q, scheme, desc_act=False)
    assert t["m.qweight"].shape == (64, 16 // 8)
    # input row 0 holds output codes 0..7, nibble i carrying element [0, 2, 4, 6, 1, 3, 5, 7][i]
    assert t["m.qweight"][0, 0].item() == 0x75316420
    assert t["m.qzeros"].shape == (2, 2) and t["m.scales"].shape == (2, 16)
    assert "m.g_idx" not in t


def test_compressed_tensors_layout_matches_pack_quantized():
    scheme = QuantScheme(4, 32, sym=False)
    q = _ramp_linear(scheme)
    t = FORMATS["compressed-tensors"].linear_tensors("m", q, scheme, desc_act=False)
    assert t["m.weight_packed"].shape == (16, 8) and t["m.weight_packed"][0, 0].item() == 0x76543210
    assert t["m.weight_shape"].tolist() == [16, 64]
    assert t["m.weight_zero_point"].shape == (2, 2)  # packed along the output dimension
    assert t["m.weight_scale"].shape == (16, 2)
    sym = FORMATS["compressed-tensors"].linear_tensors("m", q, QuantScheme(4, 32, sym=True), desc_act=False)
    assert "m.weight_zero_point" not in sym


ROUND_TRIPS = [
    (fmt, sym, desc_act)
    for fmt in sorted(FORMATS)
    for sym in (True, False)
    for desc_act in (False, True)
    if not (fmt in ("awq", "compressed-tensors") and desc_act)
]  # test_refuses_desc_act


@pytest.mark.parametrize(("fmt", "sym", "desc_act"), ROUND_TRIPS)
def test_writer_reader_round_trip(fmt, sym, desc_act):
    layout = FORMATS[fmt]
    scheme = layout.adapt_scheme(QuantScheme(4, 16, sym))
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    x = torch.randn(512, 64) * torch.linspace(0.1, 3, 64)
    q = gptq_quantize(w, _hessian_of([x]), scheme, act_order="dynamic" if desc_act else "static")
    q.bias = torch.randn(32).half()
    tensors = layout.linear_tensors("l", q, scheme, desc_act)
    back = layout.read_linear(
        "l", tensors.__getitem__, layout.quantization_config(scheme, desc_act, 0.01), set(tensors)
    )
    assert torch.equal(back.codes.long(), q.codes.long())
    assert torch.equal(back.zeros.long(), q.zeros.long())
    assert torch.equal(back.scales, q.scales)
    assert torch.equal(back.g_idx.long(), q.g_idx.long())
    assert torch.equal(back.dequantize(), q.dequantize())
    assert torch.equal(back.bias, q.bias)


@pytest.mark.parametrize("fmt", ["awq", "compressed-tensors"])
def test_refuses_desc_act(fmt):
    scheme = QuantScheme(4, 16, False)
    with pytest.raises(MergeqError, match="activation order"):
        FORMATS[fmt].linear_tensors("l", rtn_quantize(torch.randn(8, 32), scheme), scheme, desc_act=True)


def test_gptq_asym_zero_points_fit_the_v1_layout():
    scheme = FORMATS["gptq"].adapt_scheme(QuantScheme(4, 16, sym=False))
    w = torch.rand(8, 32) + 0.5  # all positive: a plain min/max zero point would be 0
    q = rtn_quantize(w, scheme)
    assert int(q.zeros.min()) >= 1
    tensors = FORMATS["gptq"].linear_tensors("l", q, scheme, False)
    back = FORMATS["gptq"].read_linear("l", tensors.__getitem__, {"bits": 4, "group_size": 16}, set(tensors))
    assert torch.equal(back.dequantize(), q.dequantize())


def _correlated_inputs(n: int, features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5
    loud = torch.ones(features)
    loud[: features // 16] = 20.0  # outlier channels
    return (torch.randn(n, features, generator=g) @ mix + 0.3 * torch.randn(n, features, generator=g)) * loud


def _hessian_of(inputs):
    """The Hessian source gptq_quantize takes: a fresh Hessian of `inputs` at every call."""
    return lambda: accumulate(inputs[0].shape[-1], "cpu", lambda add: [add(x) for x in inputs]).value()


def _output_error(w, wq, x):
    return float(((w - wq) @ x.t()).square().sum())


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", ["none", "static", "dynamic"])
def test_gptq_beats_rtn_on_layer_output(sym, act_order):
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.05
    x = _correlated_inputs(2048, 128)
    scheme = QuantScheme(4, 32, sym)
    q = gptq_quantize(w, _hessian_of(x.split(500)), scheme, act_order=act_order)
    rtn = rtn_quantize(w, scheme)
    gptq_err = _output_error(w, q.dequantize(), x)
    rtn_err = _output_error(w, rtn.dequantize(), x)
    assert gptq_err < 0.7 * rtn_err
    assert q.codes.max() <= 15 and q.codes.dtype == torch.uint8
    if act_order == "dynamic":
        assert not torch.equal(q.g_idx, rtn.g_idx)  # groups follow the activation order
        assert torch.bincount(q.g_idx.long()).tolist() == [32] * 4
    else:
        assert torch.equal(q.g_idx, rtn.g_idx)  # contiguous groups: every vLLM kernel takes them


def test_awq_beats_rtn_on_layer_output():
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.05
    x = _correlated_inputs(4096, 128, seed=3)
    scheme = QuantScheme(4, 32, sym=False)
    stats = awq.InputStats(128, rows=256, device="cpu")
    for chunk in x.split(1000):
        stats.add(chunk)
    result = awq.search_scales(w, stats, scheme, grid=20)
    assert result.alpha > 0 and result.loss < result.rtn_loss
    scaled = w * result.scales
    bound = awq.search_clip(scaled, stats.sketch / result.scales, scheme)
    q = rtn_quantize(awq.apply_clip(scaled, bound, scheme), scheme)
    awq_w = q.dequantize() / result.scales
    rtn_err = _output_error(w, rtn_quantize(w, scheme).dequantize(), x)
    awq_err = _output_error(w, awq_w, x)
    assert awq_err < 0.8 * rtn_err


def test_count_sketch_estimates_the_gram_matrix():
    x = _correlated_inputs(8192, 32, seed=5)
    stats = awq.InputStats(32, rows=512, device="cpu")
    stats.add(x)
    exact = x.t() @ x
    estimate = stats.sketch.t() @ stats.sketch
    assert torch.linalg.norm(estimate - exact) / torch.linalg.norm(exact) < 0.2
    assert torch.allclose(stats.mean_abs, x.abs().mean(0), rtol=1e-4)


def test_the_sketch_by_matmul_adds_what_index_add_adds():
    """The CUDA form of the CountSketch update (a signed one-hot matmul, in a fixed order) gives the sums the CPU's
    index_add_ gives; run here on the CPU, where both are available."""
    x = _correlated_inputs(3000, 48, seed=7)
    bucket = torch.randint(0, 64, (3000,), generator=torch.Generator().manual_seed(1))
    sign = (torch.randint(0, 2, (3000,), generator=torch.Generator().manual_seed(2)) * 2 - 1).to(torch.float32)
    by_index, by_matmul = torch.zeros(64, 48), torch.zeros(64, 48)
    awq.sketch_add(by_index, bucket, sign, x, by_matmul=False)
    awq.sketch_add(by_matmul, bucket, sign, x, by_matmul=True)
    assert by_index.abs().max() > 1 and (by_matmul - by_index).abs().max() <= 1e-5 * by_index.abs().max()


@pytest.mark.parametrize("permuted", [True, False])
def test_gptq_in_place_factorization_equals_torch_out_of_place(permuted):
    """GPTQ permutes, dampens and factors the Hessian in its own buffer (one in_features^2 matrix, not four):
    bit for bit what the gather and torch's out-of-place Cholesky, inverse and upper Cholesky give."""
    n = 1100  # not a multiple of the permutation's and transposition's blocks
    x = _correlated_inputs(3000, n, seed=3)
    x[:, 5] = 0.0  # a dead column
    h = accumulate(n, "cpu", lambda add: add(x)).value()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)) if permuted else None
    dead = torch.diagonal(h) == 0
    dead = dead[perm] if permuted else dead
    expected = h[perm[:, None], perm[None, :]] if permuted else h.clone()
    expected[dead, dead] = 1.0
    damp = 0.01 * float(torch.diagonal(expected).mean())
    expected.diagonal().add_(damp)
    lower, info = torch.linalg.cholesky_ex(expected)
    assert int(info) == 0
    expected, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    buffer = h.data_ptr()
    got = _prepared(h, perm, dead)
    assert _inverse_cholesky_upper_(got, damp, 0)
    assert got.data_ptr() == buffer  # no copy was made
    assert got.stride() == expected.stride()
    assert torch.equal(got, expected)


def test_gptq_builds_the_hessian_again_when_it_needs_more_dampening():
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    x = torch.randn(100, 256)  # rank 100 of 256: float32 Cholesky fails with a dampening of 1e-9 of the diagonal
    built = []

    def hessian():
        built.append(1)
        return _hessian_of([x])()

    q = gptq_quantize(w, hessian, QuantScheme(4, 64, True), damp_percent=1e-9)
    assert len(built) > 1  # the factorization overwrote the first one
    assert torch.isfinite(q.scales.float()).all() and q.codes.max() <= 15
    with pytest.raises(RuntimeError, match="not positive definite"):
        gptq_quantize(w, _hessian_of([x[:50]]), QuantScheme(4, 64, True), damp_percent=0.0)
