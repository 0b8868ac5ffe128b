"""Contrast datasets: loading (JSONL, CSV, two text files), errors, saving, splitting, formatting."""

from __future__ import annotations

import json

import pytest

from steerdesk.core import fileio
from steerdesk.core.datasets import (
    Dataset,
    Example,
    bundled_datasets,
    format_pair,
    format_prompt,
    load_bundled,
    load_dataset,
    resolve_dataset,
    save_dataset,
)
from steerdesk.core.errors import SteerdeskError

ROWS = [
    {"prompt": "Hi", "base": "Hello there.", "target": "What do you want?"},
    {"base": "Sure, happy to help.", "target": "Fine, whatever."},
    {"prompt": "Tricky: \"quotes\", commas, ünïcödé ✓", "base": "line one\nline two", "target": "tab\there"},
]


def _jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ loading

def test_load_jsonl(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    ds = load_dataset(f)
    assert ds.name == "pairs" and ds.paired
    assert ds.examples == [Example("Hi", "Hello there.", "What do you want?"),
                           Example("", "Sure, happy to help.", "Fine, whatever.")]
    ds.validate()


def test_load_csv(tmp_path):
    f = tmp_path / "pairs.csv"
    f.write_text('Prompt,Base,Target\nHi,"Hello, there.",Go away.\n\n,"multi\nline",x\n', encoding="utf-8")
    ds = load_dataset(f)
    assert ds.examples == [Example("Hi", "Hello, there.", "Go away."), Example("", "multi\nline", "x")]


def test_load_csv_without_prompt_column(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("target,base\nT1,B1\nT2\n", encoding="utf-8")
    ds = load_dataset(f)
    assert ds.examples == [Example("", "B1", "T1"), Example("", "", "T2")]


def test_load_two_text_files(tmp_path):
    b, t = tmp_path / "base.txt", tmp_path / "target.txt"
    b.write_text("one\n\ntwo\n", encoding="utf-8")
    t.write_text("ONE\nTWO\n", encoding="utf-8")
    ds = load_dataset(b, t)
    assert ds.paired and ds.examples == [Example("", "one", "ONE"), Example("", "two", "TWO")]
    t.write_text("ONE\nTWO\nTHREE\n", encoding="utf-8")
    ds = load_dataset(b, t)
    assert not ds.paired and len(ds) == 3
    assert ds.examples[2] == Example("", "", "THREE")
    ds.validate()  # unpaired lists may have one-sided rows
    assert len(ds.base_texts) == 2 and len(ds.target_texts) == 3


def test_bom_and_crlf_tolerated(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + (json.dumps(ROWS[0]) + "\r\n" + json.dumps(ROWS[1]) + "\r\n").encode())
    assert len(load_dataset(f)) == 2
    c = tmp_path / "bom.csv"
    c.write_bytes(b"\xef\xbb\xbfprompt,base,target\r\np,b,t\r\n")
    assert load_dataset(c).examples == [Example("p", "b", "t")]


# ------------------------------------------------------------------------------- errors

def _error(path, *args) -> str:
    with pytest.raises(SteerdeskError) as err:
        load_dataset(path, *args)
    return str(err.value)


def test_bad_json_names_file_and_line(tmp_path):
    f = _jsonl(tmp_path / "bad.jsonl", ROWS[:2], ['{"base": "x", "target": '])
    msg = _error(f)
    assert str(f) in msg and "line 3" in msg and "invalid JSON" in msg


def test_missing_field_names_file_line_and_field(tmp_path):
    f = _jsonl(tmp_path / "m.jsonl", [ROWS[0], {"prompt": "p", "base": "b"}])
    msg = _error(f)
    assert str(f) in msg and "line 2" in msg and "'target'" in msg


def test_non_string_field(tmp_path):
    f = _jsonl(tmp_path / "n.jsonl", [{"base": "b", "target": 5}])
    msg = _error(f)
    assert str(f) in msg and "line 1" in msg and "'target'" in msg and "string" in msg
    f = _jsonl(tmp_path / "o.jsonl", [ROWS[0], ["not", "an", "object"]])
    msg = _error(f)
    assert "line 2" in msg and "object" in msg


def test_non_utf8(tmp_path):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + '{"base": "caf\xe9", "target": "x"}'.encode("latin-1"))
    msg = _error(f)
    assert str(f) in msg and "line 2" in msg and "UTF-8" in msg


def test_non_utf8_line_after_a_bom(tmp_path):
    f = tmp_path / "bom.csv"
    f.write_bytes(b"\xef\xbb\xbfprompt,base,target\n\xc9t\xe9,b,c\n")  # latin-1 "Été" opens line 2
    msg = _error(f)
    assert "line 2" in msg


def test_csv_errors_name_file_and_line(tmp_path):
    f = tmp_path / "h.csv"
    f.write_text("question,answer\na,b\n", encoding="utf-8")
    msg = _error(f)
    assert str(f) in msg and "line 1" in msg and "header" in msg
    f.write_text("prompt,base,target,score\na,b,c,1\n", encoding="utf-8")
    assert "unknown column 'score'" in _error(f)
    f.write_text("prompt,base,target\na,b,c\na,b,c,d\n", encoding="utf-8")
    msg = _error(f)
    assert "line 3" in msg and "4 fields" in msg


def test_csv_error_line_after_a_multiline_field(tmp_path):
    f = tmp_path / "ml.csv"
    f.write_text('prompt,base,target\n"two\nlines",b,c\na,b,c,d\n', encoding="utf-8")
    assert "line 4" in _error(f)  # the bad row starts on physical line 4


def test_file_level_errors(tmp_path):
    assert "not found" in _error(tmp_path / "missing.jsonl")
    assert "folder" in _error(tmp_path)
    t = tmp_path / "one.txt"
    t.write_text("a\n")
    assert "base and target files together" in _error(t)
    x = tmp_path / "data.xlsx"
    x.write_text("a")
    assert "unknown dataset format" in _error(x)


def test_validate_messages():
    with pytest.raises(SteerdeskError, match="empty"):
        Dataset([], name="e").validate()
    ds = Dataset([Example("p", "b", "t"), Example("p", "b", " "), Example("p", "", "t")], name="d")
    assert ds.problems() == [(1, "target is empty"), (2, "base is empty")]
    with pytest.raises(SteerdeskError, match=r"row 2: target is empty \(and 1 more rows\)"):
        ds.validate()


# -------------------------------------------------------------------------------- saving

@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_save_round_trip(tmp_path, suffix):
    ds = Dataset([Example(**{"prompt": "", **r}) for r in ROWS], name="rt")
    f = tmp_path / f"out{suffix}"
    save_dataset(ds, f)
    back = load_dataset(f)
    assert back.examples == ds.examples
    assert back.sha256() == ds.sha256()
    assert [p.name for p in tmp_path.iterdir()] == [f.name]  # no temp file left behind


def test_save_two_text_files(tmp_path):
    ds = Dataset([Example("", "a\nb", "A"), Example("", "c", "C")])
    b, t = tmp_path / "b.txt", tmp_path / "t.txt"
    save_dataset(ds, b, t)
    assert b.read_text() == "a b\nc\n"
    assert load_dataset(b, t).examples == [Example("", "a b", "A"), Example("", "c", "C")]


def test_save_is_atomic(tmp_path):
    f = tmp_path / "keep.jsonl"
    f.write_text("original\n")

    def failing_writer(tmp):
        tmp.write_text("half-written")
        raise ValueError("disk on fire")

    with pytest.raises(ValueError):
        fileio.atomic_write_with(f, failing_writer)
    assert f.read_text() == "original\n"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.jsonl"]
    with pytest.raises(SteerdeskError, match="Cannot write"):
        save_dataset(Dataset([Example("", "b", "t")]), tmp_path / "no" / "such" / "dir.jsonl")


# ----------------------------------------------------------------------------- splitting

def test_split_deterministic_and_disjoint():
    ds = Dataset([Example(f"p{i}", f"b{i}", f"t{i}") for i in range(40)], name="s")
    train, held = ds.split(0.25, seed=3)
    train2, held2 = ds.split(0.25, seed=3)
    assert train.examples == train2.examples and held.examples == held2.examples
    assert len(held) == 10 and len(train) == 30
    assert not set(train.examples) & set(held.examples)
    assert set(train.examples) | set(held.examples) == set(ds.examples)
    # Order within each part follows the original order.
    idx = [ds.examples.index(e) for e in train.examples]
    assert idx == sorted(idx)
    assert ds.split(0.25, seed=4)[1].examples != held.examples
    assert train.paired == ds.paired


def test_split_edges():
    two = Dataset([Example("", "a", "b"), Example("", "c", "d")])
    train, held = two.split(0.1)
    assert len(train) == 1 and len(held) == 1
    train, held = two.split(0.0)
    assert len(train) == 2 and len(held) == 0
    with pytest.raises(SteerdeskError):
        two.split(1.0)


# ------------------------------------------------------------------------------ bundled

def test_bundled_datasets_load():
    names = bundled_datasets()
    assert {"neutral_rude", "formal_casual", "assistant_golden_retriever"} <= set(names)
    for name in names:
        ds = load_bundled(name)
        ds.validate()
        assert ds.paired and len(ds) >= 20
        assert all(e.prompt.strip() for e in ds.examples)
    rude = load_bundled("neutral_rude")
    assert len(rude) >= 48
    assert resolve_dataset("bundled:neutral_rude").examples == rude.examples
    assert resolve_dataset("neutral_rude").examples == rude.examples
    with pytest.raises(SteerdeskError, match="available"):
        load_bundled("nope")


# --------------------------------------------------------------------------- formatting

def test_format_pair_with_chat_template(tokenizer):
    reply = "Paris, of course."
    prefix, full = format_pair(tokenizer, "Capital of France?", reply)
    assert full.endswith(reply)
    assert not full.rstrip().endswith("<|im_end|>")
    assert full.startswith(prefix) and full[len(prefix):] == reply
    assert prefix.endswith("<|im_start|>assistant\n")
    assert "Capital of France?" in prefix
    prefix, full = format_pair(tokenizer, "Q", reply, system="Be terse.")
    assert "Be terse." in prefix and full.endswith(reply) and full.startswith(prefix)
    prefix, full = format_pair(tokenizer, "", reply)
    assert full.endswith(reply) and full.startswith(prefix)


def test_format_pair_reply_also_in_prompt(tokenizer):
    prefix, full = format_pair(tokenizer, "Say yes", "yes")
    assert full[len(prefix):] == "yes" and prefix.endswith("assistant\n")


def test_format_without_template(plain_tokenizer):
    assert format_pair(plain_tokenizer, "Q?", "A.") == ("Q?\n", "Q?\nA.")
    assert format_pair(plain_tokenizer, "", "A.") == ("", "A.")
    assert format_prompt(plain_tokenizer, "Q?") == "Q?\n"


def test_format_prompt_with_template(tokenizer):
    text = format_prompt(tokenizer, "Hello?", system="Be kind.")
    assert text.endswith("<|im_start|>assistant\n")
    assert "Be kind." in text and "Hello?" in text
