"""One schema per options dataclass (mergeq.core.options): the command-line flags and the TOML keys both come
from the dataclass fields, a bad TOML value is named with its file, line and key, and the CLI and the config
read the same input into the same options."""

from __future__ import annotations

import argparse
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from exporters.eval_options import EvalOptions
from exporters.gguf import GGUFOptions
from exporters.int4.export import Int4Exporter
from exporters.int4.options import AwqOptions, GptqOptions, Int4Options
from exporters.registry import EXPORTER_MODULES, get_exporter
from merge.options import AdapterRef, MergeConfig
from mergeq.config import ConfigError, load_config
from mergeq.core.errors import MergeqError
from mergeq.core.options import add_options, from_namespace, from_table, option, specs

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = (GGUFOptions, GptqOptions, AwqOptions, MergeConfig, EvalOptions)


def _parser(cls) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_options(parser, cls)
    return parser


def _flags(cls) -> set[str]:
    return {flag for action in _parser(cls)._actions for flag in action.option_strings} - {"-h", "--help"}


def _table(cls, table: dict):
    problems: list[tuple[str, str]] = []
    options = from_table(cls, table, problem=lambda key, message: problems.append((key, message)))
    return options, problems


@pytest.mark.parametrize("cls", SCHEMAS, ids=lambda c: c.__name__)
def test_a_field_added_to_the_dataclass_is_a_flag_and_a_key(cls):
    @dataclass(frozen=cls.__dataclass_params__.frozen, kw_only=cls is MergeConfig)
    class Extended(cls):
        probe_count: int = option(3, range=(1, 9), help="a new option")

    assert "--probe-count" in _flags(Extended) and "--probe-count" not in _flags(cls)
    required = ["--adapter", "a", "--out", "o"] if cls is MergeConfig else []
    assert from_namespace(Extended, _parser(Extended).parse_args(["--probe-count", "5", *required])).probe_count == 5
    options, problems = _table(Extended, {"probe_count": 7, **({"adapters": ["a"]} if cls is MergeConfig else {})})
    assert not problems and options.probe_count == 7
    _, problems = _table(cls, {"probe_count": 7})
    assert problems and problems[0][0] == "probe_count" and "unknown key" in problems[0][1]
    for bad, why in ((0, "out of range: 1 to 9"), ("7", "expected int, got str '7'"), (True, "expected int")):
        _, problems = _table(Extended, {"probe_count": bad})
        assert problems[0][0] == "probe_count" and why in problems[0][1], problems
    with pytest.raises(argparse.ArgumentError, match="argument --probe-count: 0 is out of range: 1 to 9"):
        _parser(Extended).parse_args(["--probe-count", "0", *required])


@pytest.mark.parametrize("cls", SCHEMAS, ids=lambda c: c.__name__)
def test_every_option_field_is_a_flag_and_a_key_unless_marked(cls):
    flags, keys = _flags(cls), set()
    for spec in specs(cls):
        if spec.opt.cli:
            assert {spec.flag, spec.opt.off_flag} - {None} <= flags, spec.name
        if spec.opt.toml:
            keys.add(spec.key)
    _, problems = _table(cls, {"no_such_key": 1})
    (listed,) = [m for k, m in problems if k == "no_such_key"]
    assert listed.endswith("allowed keys are " + ", ".join(sorted(keys)))
    option_fields = {s.name for s in specs(cls)}
    assert option_fields <= {f.name for f in fields(cls)}


def test_int4_targets_are_one_exporter_with_their_own_options():
    gptq, awq = get_exporter("gptq"), get_exporter("awq")
    assert isinstance(gptq(), Int4Exporter) and isinstance(awq(), Int4Exporter)
    assert (gptq().method, gptq.options, awq().method, awq.options) == ("gptq", GptqOptions, "awq", AwqOptions)
    assert {"--desc-act", "--act-order", "--damp-percent"} <= _flags(GptqOptions)
    assert not {"--desc-act", "--act-order", "--damp-percent"} & _flags(AwqOptions)
    assert (GptqOptions().samples, GptqOptions().seq_len) == (128, 512)
    assert (AwqOptions().samples, AwqOptions().seq_len) == (64, 256)
    _, problems = _table(AwqOptions, {"desc_act": True, "bits": 8})
    assert [k for k, _ in problems] == ["desc_act", "bits"]
    with pytest.raises(MergeqError, match="awq exporter was given gptq options"):
        awq().preflight(Path("nowhere"), GptqOptions())
    with pytest.raises(MergeqError, match="awq options are AwqOptions"):  # one default per setting: the target's
        Int4Options(method="awq")
    assert Int4Options(method="rtn").samples == 128 and AwqOptions(samples=8).method == "awq"


def test_cli_and_config_read_the_same_options(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("text")
    argv = [
        "--group-size",
        "64",
        "--asym",
        "--desc-act",
        "--act-order",
        "none",
        "--calib",
        str(calib),
        "--samples",
        "8",
        "--format",
        "compressed-tensors",
        "--damp-percent",
        "0.05",
    ]
    from_cli = from_namespace(GptqOptions, _parser(GptqOptions).parse_args(argv))
    from_toml, problems = _table(
        GptqOptions,
        {
            "group_size": 64,
            "sym": False,
            "desc_act": True,
            "act_order": "none",
            "calib": str(calib),
            "samples": 8,
            "format": "compressed-tensors",
            "damp_percent": 0.05,
        },
    )
    assert not problems and from_cli == from_toml
    merge_cli = from_namespace(
        MergeConfig,
        _parser(MergeConfig).parse_args(
            [
                "--base",
                "b",
                "--adapter",
                "a@0.5",
                "--adapter",
                "c",
                "--out",
                "o",
                "--no-validate",
                "--qlora",
                "off",
                "--max-shard-size",
                "0.5",
            ]
        ),
    )
    assert merge_cli.adapter_refs() == [AdapterRef(Path("a"), 0.5), AdapterRef(Path("c"), 1.0)]
    assert (merge_cli.validate, merge_cli.qlora, merge_cli.max_shard_bytes) == (False, "off", 1 << 29)
    merge_toml, problems = _table(
        MergeConfig, {"base": "b", "adapters": [{"path": "a", "weight": 0.5}, "c"], "validate": False, "qlora": "off"}
    )
    assert not problems and merge_toml.adapter_refs() == merge_cli.adapter_refs()
    _, problems = _table(MergeConfig, {"adapters": [{"path": "a", "colour": 1}], "out": "x"})
    assert [k for k, _ in problems] == ["adapters", "out"]
    assert "unknown adapter key colour" in problems[0][1]


def test_legacy_requantize_flags_make_the_same_settings():
    def parse(*argv: str) -> MergeConfig:
        return from_namespace(MergeConfig, _parser(MergeConfig).parse_args(["--adapter", "a", "--out", "o", *argv]))

    explicit = parse("--requantize", "fp4", "--quant-blocksize", "128", "--no-double-quant").requantize
    assert (explicit.quant_type, explicit.blocksize, explicit.double_quant) == ("fp4", 128, False)
    by_mode = parse("--qlora", "nf4", "--quant-blocksize", "128").requantize
    assert (by_mode.quant_type, by_mode.blocksize, by_mode.double_quant) == ("nf4", 128, True)
    assert parse("--qlora", "nf4").requantize is None  # blocksize 64: the detection decides double quant
    with pytest.raises(MergeqError, match="blocksize 100"):
        parse("--requantize", "nf4", "--quant-blocksize", "100")


def _pipeline(tmp_path: Path, gptq: str) -> Path:
    for folder in ("base", "adapter"):
        (tmp_path / folder).mkdir()
    (tmp_path / "calib.txt").write_text("text")
    config = tmp_path / "run.toml"
    config.write_text(
        f'[merge]\nbase = "base"\nadapters = ["adapter"]\n\n[eval]\nenabled = false\n\n'
        f'[gptq]\ncalib = "calib.txt"\n{gptq}\n'
    )
    return config


@pytest.mark.parametrize(
    "line, message",
    [
        ('group_size = "64"', "[gptq] group_size: expected int, got str '64'"),
        ("samples = 0", "[gptq] samples: 0 is out of range: at least 1"),
        ('format = "zip"', "[gptq] format: 'zip' is not one of native, compressed-tensors"),
        ("bits = [4]", "[gptq] bits: expected one value, got a list [4]"),
        (
            "colour = 1",
            "[gptq] colour: unknown key; allowed keys are act_order, bits, calib, damp_percent, desc_act, "
            "device, exclude, format, group_size, samples, seq_len, sym",
        ),
    ],
)
def test_a_bad_toml_value_names_file_line_and_option(tmp_path, line, message):
    config = _pipeline(tmp_path, f"sym = true\n{line}")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert f"{config.resolve()}:11: {message}" in str(caught.value)


def test_a_good_config_resolves_paths_against_its_file(tmp_path):
    config = load_config(_pipeline(tmp_path, "sym = false\ngroup_size = 32"))
    gptq = config.exports["gptq"]
    assert isinstance(gptq, GptqOptions) and (gptq.sym, gptq.group_size) == (False, 32)
    assert gptq.calib == (tmp_path / "calib.txt").resolve()
    assert config.merge.base == (tmp_path / "base").resolve() and not config.evaluation.enabled
    root = tmp_path.resolve()
    assert config.resolved()["merge"] == {
        "base": str(root / "base"),
        "dtype": "float16",
        "qlora": "auto",
        "adapters": [{"path": str(root / "adapter"), "weight": 1.0}],
        "qlora_base": None,
        "validate": True,
    }


def test_readme_config_keys_and_flags_exist():
    """The README's pipeline config uses only keys the schemas accept, and its command lines only their flags."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```toml\n(.*?)```", readme, re.S).group(1)
    tables = {"merge": MergeConfig, "eval": EvalOptions} | {t: get_exporter(t).options for t in EXPORTER_MODULES}
    for section, table in tomllib.loads(block).items():
        keys = {s.key for s in specs(tables[section]) if s.opt.toml}
        assert set(table) <= keys, (section, set(table) - keys)
    for target in EXPORTER_MODULES:
        from mergeq.commands.export import target_parser

        known = {f for a in target_parser(target)._actions for f in a.option_strings}
        for command in re.findall(rf"mergeq export {target} (.*)", readme):
            used = set(re.findall(r"(--[a-z][a-z0-9-]*)", command.split("#")[0]))
            assert used <= known, (target, used - known)
