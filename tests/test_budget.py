"""`mergeq run --check`'s budget: predicted peak memory and disk per stage from the base's shapes, and the
refusal to start when the disk cannot hold the outputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tiny_models import tiny_llama

from exporters.gguf import GGUFOptions
from exporters.int4.options import AwqOptions, GptqOptions
from mergeq import budget
from mergeq.core.errors import MergeqError


def test_shapes_are_read_from_the_checkpoint_headers(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_llama(tmp_path / "base", layers=3, hidden=32, intermediate=64, vocab=96)
    shapes = budget.read_shapes(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    state = model.state_dict()
    assert shapes.params == sum(t.numel() for t in state.values())
    assert shapes.matrix_params == sum(t.numel() for t in state.values() if t.dim() == 2)
    assert shapes.largest_layer == sum(t.numel() for n, t in state.items() if n.startswith("model.layers.0."))
    assert shapes.largest_tensor == 96 * 32 and shapes.hidden == 32 and shapes.vocab == 96
    assert shapes.widest_input == 64, "down_proj reads the intermediate width"
    assert shapes.largest_linear == 64 * 32, "the largest matrix inside a layer (gate, up, down: 64 x 32)"
    assert shapes.layer_matrix_params == sum(
        t.numel() for n, t in state.items() if t.dim() == 2 and n.startswith("model.layers.")
    )


def test_budgets_follow_the_shapes_and_options():
    shapes = budget.Shapes(
        params=8_000_000_000,
        matrix_params=7_900_000_000,
        largest_tensor=128256 * 4096,
        largest_layer=218_112_000,
        hidden=4096,
        vocab=128256,
        widest_input=14336,
        largest_linear=14336 * 4096,
        layer_matrix_params=6_976_000_000,
    )
    small = GptqOptions(samples=8, seq_len=256, group_size=128)
    large = GptqOptions(samples=16, seq_len=256, group_size=128)
    config = SimpleNamespace(exports={"gguf": GGUFOptions(quants=("Q8_0",)), "gptq": small})
    merge, gguf, gptq = budget.stage_budgets(config, shapes)
    assert merge.peak_bytes < shapes.params * 2, "the predicted merge peak is below the fp16 model's size"
    # streamed: one layer as stored (fp16), one matrix cast to fp32, one group of logits and their log-softmax;
    # never an fp32 copy of the embedding (measured at these widths: 1.25 GiB merging, 1.62 GiB evaluating)
    logits = 2 * max(256 << 20, 512 * 128256 * 4)  # mergeq.core.memory.LOGITS_BUDGET_BYTES, or one window
    assert merge.peak_bytes == budget.RUNTIME_BYTES + 218_112_000 * 2 + 14336 * 4096 * 4 + logits
    assert merge.peak_bytes < 2.2 * budget.GIB
    assert merge.stage == "merge" and merge.disk_bytes == shapes.params * 2
    deeper = budget.Shapes(
        **{
            **shapes.__dict__,
            "params": 2 * shapes.params,
            "matrix_params": 2 * shapes.matrix_params,
            "layer_matrix_params": 2 * shapes.layer_matrix_params,
        }
    )
    assert [b.peak_bytes for b in budget.stage_budgets(config, deeper)][0::2] == [merge.peak_bytes, gptq.peak_bytes], (
        "every stage streams layers: twice the depth, the same predicted peak"
    )
    assert gguf.disk_bytes == shapes.params * 2 + int(shapes.matrix_params * 8.5 / 8 + 100_000_000 * 4)
    assert gguf.kept == gguf.disk_bytes - shapes.params * 2, "the f16 intermediate is removed when the stage ends"
    # llama-perplexity copies the 8.5 GB Q8_0 file into its CPU layout, beside a batch of logits
    assert gguf.peak_bytes == budget.LLAMACPP_RUNTIME_BYTES + gguf.kept + 2 * (256 << 20)
    activations = 8 * 256 * 4096 * 4 * 2  # samples x seq x hidden, in and out, fp32
    # the int4 checkpoint (0.36 of fp16, embeddings in fp16) and the per-layer resume copy of its layers (0.23)
    # while the stage runs, plus one layer's outputs
    assert shapes.params * 2 * 0.5 < gptq.disk_bytes < shapes.params * 2 * 0.6
    layers = int(6_976_000_000 * (0.5 + 4 / 128))
    assert gptq.disk_bytes - gptq.kept == layers + activations // 2, "the resume copy goes when the stage ends"
    # the layers' 6.98 G weights in 4 bits with a scale and zero per 128, the other 1.02 G (embeddings) in fp16
    assert gptq.kept == int(6_976_000_000 * (0.5 + 4 / 128) + 1_024_000_000 * 2)
    bigger = budget.stage_budgets(SimpleNamespace(exports={"gptq": large}), shapes)[1]
    assert bigger.peak_bytes - gptq.peak_bytes == activations * 3 // 2, "activations, and one serialized copy"
    assert bigger.disk_bytes - gptq.disk_bytes == activations // 2, "one layer's outputs in the resume folder"
    awq = budget.stage_budgets(
        SimpleNamespace(exports={"awq": AwqOptions(samples=8, seq_len=256, group_size=128)}), shapes
    )[1]
    hessians = 14336**2 * 4  # GPTQ: down_proj's Hessian, permuted and factored in its own buffer
    assert gptq.peak_bytes - awq.peak_bytes == hessians, (gptq.peak_bytes, awq.peak_bytes)


def test_a_run_that_cannot_fit_on_the_disk_is_refused_before_any_work(tmp_path, monkeypatch):
    stages = [budget.StageBudget("merge", 1, 3 * budget.GIB, ""), budget.StageBudget("gptq", 1, 1 * budget.GIB, "")]
    monkeypatch.setattr(budget, "free_bytes", lambda path: 2 * budget.GIB)
    with pytest.raises(
        MergeqError,
        match=r"has 2.00 GiB free, and the stages still to run \(merge, gptq\) are "
        r"predicted to need 4.00 GiB at once",
    ):
        budget.check_disk(stages, tmp_path / "out", ["merge", "gptq"])
    budget.check_disk(stages, tmp_path / "out", ["gptq"])  # merge already done: 1 GiB fits
    assert not (tmp_path / "out").exists()


def test_transient_files_count_once_when_stages_run_one_at_a_time():
    """A stage's transient files (the GGUF intermediate, an int4 stage's per-layer copy) are gone when it ends:
    one at a time, the disk holds everything kept plus the largest transient; Ray may run them together."""
    gib = budget.GIB
    merge = budget.StageBudget("merge", 1, 15 * gib, "")
    gguf = budget.StageBudget("gguf", 1, 20 * gib, "", kept_bytes=5 * gib)  # a 15 GiB intermediate
    gptq = budget.StageBudget("gptq", 1, 11 * gib, "", kept_bytes=5 * gib)  # a 6 GiB resume copy
    assert budget.disk_needed([merge, gguf, gptq]) == (15 + 5 + 5 + 15) * gib
    assert budget.disk_needed([merge, gguf, gptq], one_at_a_time=False) == (15 + 5 + 5 + 15 + 6) * gib
    assert budget.disk_needed([gptq]) == 11 * gib


def test_the_table_names_every_stage(tmp_path):
    stages = [budget.StageBudget("merge", 2 * budget.GIB, 3 * budget.GIB, "why")]
    table = budget.format_table(stages, tmp_path / "not-yet")
    assert "merge" in table and "2.00 GiB" in table and "3.00 GiB" in table and "free on" in table
