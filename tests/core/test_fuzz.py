"""Fuzzing the file loaders: whatever the bytes, the only exception is SteerdeskError."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steerdesk.core.datasets import load_dataset, parse_csv, parse_jsonl
from steerdesk.core.errors import SteerdeskError
from steerdesk.core.vectors import VectorSet, export_gguf, import_gguf, load_vectors, save_vectors

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
_DIR = tempfile.mkdtemp(prefix="steerdesk-fuzz-")


def _write(name: str, data: bytes) -> str:
    path = os.path.join(_DIR, name)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def _valid_vectors() -> VectorSet:
    return VectorSet(torch.randn(4, 8), torch.rand(4) + 1, {
        "format": "steerdesk.vectors/1", "model": "m", "architecture": "LlamaForCausalLM", "num_layers": "4",
        "hidden_size": "8", "method": "mean-diff", "read_position": "last", "layer_convention": "block_output"},
        proj_base=torch.randn(4, 3), proj_target=torch.randn(4, 3))


def _bytes_of(writer, suffix: str) -> bytes:
    path = os.path.join(_DIR, "valid" + suffix)
    writer(_valid_vectors(), path)
    with open(path, "rb") as fh:
        return fh.read()


VALID_ST = _bytes_of(save_vectors, ".safetensors")
VALID_GGUF = _bytes_of(export_gguf, ".gguf")

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
                           lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=8), children, max_size=3), max_leaves=8)
rows = st.dictionaries(st.sampled_from(["prompt", "base", "target", "extra"]), json_values, max_size=4)


@FUZZ
@given(st.text())
def test_jsonl_text(text):
    try:
        parse_jsonl(text, "fuzz.jsonl")
    except SteerdeskError:
        pass


@FUZZ
@given(st.lists(rows | json_values, max_size=6))
def test_jsonl_structured(objs):
    text = "\n".join(json.dumps(o) for o in objs)
    try:
        ds = parse_jsonl(text, "fuzz.jsonl")
    except SteerdeskError:
        return
    assert all(isinstance(e.base, str) and isinstance(e.target, str) for e in ds.examples)


@FUZZ
@given(st.text())
def test_csv_text(text):
    try:
        parse_csv(text, "fuzz.csv")
    except SteerdeskError:
        pass


@FUZZ
@given(st.binary(), st.sampled_from([".jsonl", ".csv", ".json", ".txt", ".xyz"]))
def test_dataset_file_bytes(data, suffix):
    try:
        load_dataset(_write("data" + suffix, data))
    except SteerdeskError:
        pass


def _mutate(data: bytes, draw_ops) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in draw_ops:
        if not buf:
            break
        i = pos % len(buf)
        if kind == "flip":
            buf[i] = value
        elif kind == "cut":
            del buf[i:]
        elif kind == "insert":
            buf[i:i] = bytes([value]) * (1 + value % 7)
    return bytes(buf)


ops = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert"]), st.integers(0, 10**6), st.integers(0, 255)),
               min_size=1, max_size=4)


@FUZZ
@given(st.binary(max_size=512))
def test_vector_file_random_bytes(data):
    for suffix in (".safetensors", ".gguf"):
        try:
            load_vectors(_write("v" + suffix, data))
        except SteerdeskError:
            pass


@FUZZ
@given(ops)
def test_safetensors_mutations(mutations):
    path = _write("m.safetensors", _mutate(VALID_ST, mutations))
    try:
        vs = load_vectors(path)
    except SteerdeskError:
        return
    assert torch.isfinite(vs.directions).all() and vs.directions.ndim == 2


@FUZZ
@given(ops)
def test_gguf_mutations(mutations):
    path = _write("m.gguf", _mutate(VALID_GGUF, mutations))
    try:
        vs = import_gguf(path)
    except SteerdeskError:
        return
    assert torch.isfinite(vs.directions).all() and vs.directions.ndim == 2


def test_valid_files_still_load():
    assert load_vectors(_write("ok.safetensors", VALID_ST)).num_layers == 4
    assert import_gguf(_write("ok.gguf", VALID_GGUF)).num_layers == 4


@pytest.mark.parametrize("cut", [0, 8, 50, len(VALID_ST) // 2, len(VALID_ST) - 1])
def test_truncated_safetensors(cut):
    with pytest.raises(SteerdeskError):
        load_vectors(_write("t.safetensors", VALID_ST[:cut]))


@pytest.mark.parametrize("cut", [0, 4, 30, len(VALID_GGUF) // 2, len(VALID_GGUF) - 1])
def test_truncated_gguf(cut):
    with pytest.raises(SteerdeskError):
        load_vectors(_write("t.gguf", VALID_GGUF[:cut]))


@pytest.mark.parametrize("claim", ["metadata", "layer_count", "direction"])
def test_gguf_claiming_absurd_layer_counts_is_refused_without_allocating(claim):
    """A damaged count (found by the fuzzer: one run allocated 24 GB and was OOM-killed)."""
    import gguf

    path = os.path.join(_DIR, f"huge-{claim}.gguf")
    writer = gguf.GGUFWriter(path, "controlvector")
    writer.add_int32("controlvector.layer_count", 2_000_000_000 if claim == "layer_count" else 3)
    if claim == "metadata":
        writer.add_string("steerdesk.metadata", json.dumps({"num_layers": "1999999999"}))
    layer = 1_999_999_999 if claim == "direction" else 1
    writer.add_tensor(f"direction.{layer}", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SteerdeskError, match="claims .* layers"):
        import_gguf(path)


def test_gguf_array_claiming_more_elements_than_bytes_is_refused_without_reading_them():
    """gguf-py loops over every claimed array element, past the end of the file: a header claiming
    2^40 elements must be refused by steerdesk's header walk first (it exhausted memory before)."""
    import struct

    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"a" + struct.pack("<IIQ", 9, 0, 2**40)
    path = _write("huge-array.gguf", header + b"\0" * 64)
    with pytest.raises(SteerdeskError, match="claims 1099511627776 elements"):
        import_gguf(path)
