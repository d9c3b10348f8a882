"""`mergeq run --check` on a real config: the budget table first, then the disk check `mergeq run` itself makes
(exit 2 with the stages and sizes named when the disk cannot hold them); nothing is written either way."""

from __future__ import annotations

from mergeq import budget
from mergeq.cli import main


def test_check_prints_the_budgets_then_refuses_a_disk_too_small(tmp_path, builders, monkeypatch, capsys):
    base = builders.llama(tmp_path / "base")
    builders.adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    config = tmp_path / "run.toml"
    (tmp_path / "calib.txt").write_text("some calibration text, repeated. " * 40)
    config.write_text(
        '[merge]\nbase = "base"\nadapters = [{ path = "adapter" }]\n\n[eval]\nenabled = false\n\n'
        '[awq]\ngroup_size = 32\ncalib = "calib.txt"\n'
    )
    out = tmp_path / "out"
    need = budget.disk_needed(budget.stage_budgets(*_config_and_shapes(config)))
    monkeypatch.setattr(budget, "free_bytes", lambda path: need - 1)
    assert main(["run", str(config), "--out", str(out), "--check"]) == 2
    printed = capsys.readouterr()
    assert "merge" in printed.out and "disk needed at once" in printed.out
    assert "stages still to run (merge, awq) are predicted to need" in " ".join(printed.err.split())
    monkeypatch.setattr(budget, "free_bytes", lambda path: need)
    assert main(["run", str(config), "--out", str(out), "--check"]) == 0
    assert "the output disk can hold the stages still to run (merge, awq)" in capsys.readouterr().out
    assert not out.exists()


def _config_and_shapes(path):
    from mergeq.config import load_config

    config = load_config(path)
    return config, budget.read_shapes(config.merge.base)
