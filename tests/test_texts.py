"""Calibration/evaluation texts in the user's format, and no silent demo default."""

from __future__ import annotations

import hashlib
import json

import pytest
from int4_models import byte_tokenizer, calibration_text, tiny_model

from mergeq.core.errors import MergeqError
from mergeq.core.texts import load_text
from mergeq.textopts import resolve_text_option

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
CHATS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Merge what?"},
        {"role": "assistant", "content": "The adapter into its base."},
    ],
    [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Quantize it."}],
]


@pytest.fixture
def chat_tokenizer(tmp_path):
    tokenizer = byte_tokenizer(tmp_path / "tok")
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_plain_text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("one\ntwo\n")
    loaded = load_text(path)
    assert loaded.text == "one\ntwo" and loaded.format == "txt" and loaded.samples == 1
    assert loaded.sha256 == hashlib.sha256(b"one\ntwo\n").hexdigest()
    assert loaded.describe(5) == {
        "file": str(path),
        "sha256": loaded.sha256,
        "format": "txt",
        "samples": 1,
        "rendering": "the file as it is",
        "tokens": 5,
    }


def test_jsonl_text(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n"third"\n')
    loaded = load_text(path)
    assert loaded.text == "first\n\nsecond\n\nthird" and loaded.format == "jsonl/text" and loaded.samples == 3


def test_jsonl_messages_use_the_chat_template(tmp_path, chat_tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in CHATS) + "\n")
    loaded = load_text(path, tokenizer=chat_tokenizer)
    assert loaded.format == "jsonl/messages" and loaded.samples == 2 and "chat template" in loaded.rendering
    assert loaded.text.startswith("<|system|>\nYou are terse.\n<|user|>\nMerge what?\n")
    assert "\n\n<|user|>\nAnd then?" in loaded.text
    with pytest.raises(MergeqError, match="no chat template"):
        load_text(path, tokenizer=byte_tokenizer(tmp_path / "plain"))


def test_parquet_column(tmp_path, chat_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [1, 2], "body": ["alpha beta", "gamma"], "messages": CHATS}), path)
    loaded = load_text(f"{path}:body")
    assert loaded.text == "alpha beta\n\ngamma" and loaded.format == "parquet/body" and loaded.samples == 2
    chat = load_text(path, tokenizer=chat_tokenizer)  # no column: `text`, else `messages`
    assert chat.format == "parquet/messages (messages)" and chat.text.startswith("<|system|>")
    with pytest.raises(MergeqError, match="no column 'nope' \\(columns: id, body, messages\\)"):
        load_text(f"{path}:nope")
    with pytest.raises(MergeqError, match="holds int, not text"):
        load_text(f"{path}:id")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": 1}\n', 'no "text" field'),
        ("not json\n", "not valid JSON"),
        ('{"messages": [{"role": "wizard", "content": "x"}]}\n', "unknown chat role 'wizard'"),
        ('{"messages": [{"role": "user"}]}\n', 'string "content"'),
        ('{"text": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n', "mixes"),
    ],
)
def test_bad_jsonl(tmp_path, chat_tokenizer, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(MergeqError, match=message) as err:
        load_text(path, tokenizer=chat_tokenizer)
    assert str(path) in str(err.value)


def test_missing_text_is_an_error_naming_the_option():
    with pytest.raises(MergeqError) as err:
        resolve_text_option(None, option="--calib", purpose="calibration")
    text = str(err.value) + " " + (err.value.hint or "")
    assert "no calibration text given: pass --calib FILE" in text
    assert ".jsonl" in text and ".parquet:COLUMN" in text and "--calib demo" in text


def test_calibration_report_names_the_text(tmp_path, chat_tokenizer):
    from exporters.int4.calibration import load_calibration

    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in CHATS * 20) + "\n")
    calibration = load_calibration(path, chat_tokenizer, samples=4, seq_len=32)
    described = calibration.describe()
    assert described["calib_format"] == "jsonl/messages" and described["calib_file_samples"] == 40
    assert described["calib_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert described["calib_text_tokens"] > 4 * 32 and "chat template" in described["calib_rendering"]


def test_export_without_texts_stops_before_any_work(tmp_path, capsys):
    from mergeq.cli import main

    model = tiny_model(tmp_path / "m")
    out = tmp_path / "out"
    code = main(["export", "gptq", "--model", str(model), "--out", str(out), "--no-eval"])
    err = capsys.readouterr().err
    assert code == 2 and "no calibration text given: pass --calib FILE" in err, err
    calib = calibration_text(tmp_path / "c.txt")
    code = main(["export", "gptq", "--model", str(model), "--out", str(out), "--calib", str(calib)])
    err = capsys.readouterr().err
    assert code == 2 and "no evaluation text given: pass --eval-text FILE" in err, err
    assert not out.exists()


def test_evaluation_report_names_the_text(tmp_path):
    from exporters.eval_options import EvalOptions
    from exporters.evaluate import evaluate_full

    model = tiny_model(tmp_path / "m")
    path = tmp_path / "e.jsonl"
    path.write_text(
        "\n".join(json.dumps({"text": calibration_text(tmp_path / f"{i}.txt", 400, i).read_text()}) for i in range(4))
        + "\n"
    )
    result = evaluate_full(model, model, path, EvalOptions(n_ctx=64, max_windows=4, cache_dir=tmp_path / "cache"))
    source = result.provenance["text_source"]
    assert source["format"] == "jsonl/text" and source["samples"] == 4 and source["tokens"] > 256
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
