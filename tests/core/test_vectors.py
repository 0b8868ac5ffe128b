"""Vector-set files: safetensors round trip, compatibility checks, damaged files, GGUF interop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from steerdesk.core.errors import SteerdeskError
from steerdesk.core.models import ModelInfo
from steerdesk.core.vectors import VectorSet, export_gguf, import_gguf, load_vectors, save_vectors

LAYERS, HIDDEN = 5, 16
INFO = ModelInfo(name="tiny-llama", architecture="LlamaForCausalLM", num_layers=LAYERS, hidden_size=HIDDEN,
                 device="cpu", dtype="float32", has_chat_template=True, block_path="model.layers", source="")


def _vs(layers: int = LAYERS, hidden: int = HIDDEN, arch: str = "LlamaForCausalLM") -> VectorSet:
    g = torch.Generator().manual_seed(0)
    meta = {
        "format": "steerdesk.vectors/1", "model": "tiny-llama", "architecture": arch,
        "num_layers": str(layers), "hidden_size": str(hidden), "method": "mean-diff",
        "read_position": "last", "layer_convention": "block_output", "dataset_sha256": "ab" * 32,
        "created": "2026-01-01T00:00:00+00:00", "steerdesk_version": "0.1.0", "dataset_name": "unit ✓",
    }
    return VectorSet(directions=torch.randn(layers, hidden, generator=g),
                     norms=torch.rand(layers, generator=g) + 1.0, metadata=meta,
                     proj_base=torch.randn(layers, 3, generator=g), proj_target=torch.randn(layers, 3, generator=g))


def _raw_save(path, tensors, metadata):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


# --------------------------------------------------------------------------- safetensors

def test_safetensors_round_trip(tmp_path):
    vs = _vs()
    f = tmp_path / "v.safetensors"
    save_vectors(vs, f)
    back = load_vectors(f)
    assert torch.equal(back.directions, vs.directions)
    assert torch.equal(back.norms, vs.norms)
    assert torch.equal(back.proj_base, vs.proj_base) and torch.equal(back.proj_target, vs.proj_target)
    assert back.metadata == vs.metadata
    assert back.directions.dtype == torch.float32
    back.check_compatible(INFO)
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


def test_compatible_with_the_model_it_came_from(tiny):
    from steerdesk.core.datasets import Dataset, Example
    from steerdesk.core.extract import compute_vectors

    vs = compute_vectors(tiny, Dataset([Example("q", "yes", "no"), Example("r", "fine", "bad")]))
    vs.check_compatible(tiny.info)


@pytest.mark.parametrize("other,words", [
    (dataclasses.replace(INFO, hidden_size=32), "hidden size 16 vs 32"),
    (dataclasses.replace(INFO, num_layers=30), "5 layers vs 30"),
    (dataclasses.replace(INFO, architecture="GPT2LMHeadModel"), "architecture LlamaForCausalLM vs GPT2LMHeadModel"),
])
def test_check_compatible_names_the_difference(other, words):
    with pytest.raises(SteerdeskError) as err:
        _vs().check_compatible(other)
    assert words in str(err.value)
    assert "tiny-llama" in str(err.value)


def test_check_compatible_unknown_convention():
    vs = _vs()
    vs.metadata["layer_convention"] = "block_input"
    with pytest.raises(SteerdeskError, match="layer convention"):
        vs.check_compatible(INFO)


def test_relative_strength():
    vs = _vs()
    rel = vs.relative_strength(2.0)
    torch.testing.assert_close(rel, 2.0 * vs.directions.norm(dim=-1) / vs.norms)
    torch.testing.assert_close(vs.relative_strength(-3.0, normalize=True), 3.0 / vs.norms)


def _load_error(path) -> str:
    with pytest.raises(SteerdeskError) as err:
        load_vectors(path)
    return str(err.value)


def test_damaged_files(tmp_path):
    f = tmp_path / "v.safetensors"
    save_vectors(_vs(), f)
    data = f.read_bytes()
    for name, content in [("truncated", data[: len(data) // 2]), ("header-only", data[:8]),
                          ("garbage", b"\x00\x01not a safetensors file at all"), ("empty", b""),
                          ("huge-header", (2**62).to_bytes(8, "little") + b"{}")]:
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        msg = _load_error(bad)
        assert str(bad) in msg, name
    assert "not found" in _load_error(tmp_path / "missing.safetensors")


def test_nan_directions_refused(tmp_path):
    vs = _vs()
    vs.directions[3, 2] = float("nan")
    f = tmp_path / "nan.safetensors"
    save_vectors(vs, f)
    msg = _load_error(f)
    assert "layer 3" in msg and "NaN" in msg
    vs.directions[3, 2] = float("inf")
    save_vectors(vs, f)
    assert "layer 3" in _load_error(f)


def test_inconsistent_files_refused(tmp_path):
    vs = _vs()
    meta = {k: v for k, v in vs.metadata.items()}
    f = tmp_path / "x.safetensors"
    _raw_save(f, {"norms": vs.norms}, meta)
    assert "no 'directions'" in _load_error(f)
    _raw_save(f, {"directions": vs.directions, "norms": vs.norms}, {**meta, "format": "other/9"})
    assert "unknown vector format" in _load_error(f)
    _raw_save(f, {"directions": vs.directions, "norms": vs.norms}, {k: v for k, v in meta.items() if k != "method"})
    assert "missing method" in _load_error(f)
    _raw_save(f, {"directions": vs.directions, "norms": vs.norms}, {**meta, "num_layers": "7"})
    assert "num_layers=7" in _load_error(f)
    _raw_save(f, {"directions": vs.directions, "norms": vs.norms[:2].clone()}, meta)
    assert "'norms'" in _load_error(f)
    _raw_save(f, {"directions": vs.directions[0].clone(), "norms": vs.norms}, {**meta, "num_layers": "16"})
    _load_error(f)  # a 1-D "directions" is refused (whatever the exact words)


# ----------------------------------------------------------------------------------- GGUF

def test_gguf_export_layout(tmp_path):
    import gguf

    vs = _vs()
    f = tmp_path / "cv.gguf"
    written = export_gguf(vs, f)
    assert written == list(range(1, LAYERS))
    reader = gguf.GGUFReader(str(f))
    fields = reader.fields

    def text(name):
        fld = fields[name]
        return bytes(fld.parts[fld.data[0]]).decode()

    assert text("general.architecture") == "controlvector"
    assert text("controlvector.model_hint") == "llama"
    assert "controlvector.layer_count" in fields
    lc = fields["controlvector.layer_count"]
    assert int(lc.parts[lc.data[0]][0]) == LAYERS - 1
    names = [t.name for t in reader.tensors]
    assert names == [f"direction.{i}" for i in range(1, LAYERS)]
    for t in reader.tensors:
        layer = int(t.name.split(".")[1])
        assert t.tensor_type.name == "F32"
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), vs.directions[layer].numpy())


def test_gguf_round_trip(tmp_path):
    vs = _vs()
    f = tmp_path / "cv.gguf"
    export_gguf(vs, f)
    for back in (import_gguf(f), load_vectors(f)):
        assert back.num_layers == LAYERS and back.hidden_size == HIDDEN
        assert torch.equal(back.directions[0], torch.zeros(HIDDEN))
        assert torch.equal(back.directions[1:], vs.directions[1:])
        assert torch.equal(back.norms, vs.norms)
        for key in ("model", "architecture", "method", "read_position", "dataset_sha256", "dataset_name"):
            assert back.metadata[key] == vs.metadata[key]
        assert back.metadata["layer_convention"] == "block_output"
        back.check_compatible(INFO)


def test_gguf_foreign_control_vector(tmp_path):
    """A repeng / llama.cpp style file: no steerdesk metadata, only some layers."""
    import gguf

    f = tmp_path / "foreign.gguf"
    w = gguf.GGUFWriter(str(f), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 2)
    vecs = {2: np.arange(HIDDEN, dtype=np.float32), 3: -np.ones(HIDDEN, dtype=np.float32)}
    for layer, v in vecs.items():
        w.add_tensor(f"direction.{layer}", v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    vs = import_gguf(f, num_layers=LAYERS)
    assert vs.num_layers == LAYERS
    for layer in range(LAYERS):
        want = torch.from_numpy(vecs[layer]) if layer in vecs else torch.zeros(HIDDEN)
        assert torch.equal(vs.directions[layer], want)
    assert torch.isnan(vs.norms).all()
    assert vs.metadata["model"] == "llama"
    assert import_gguf(f).num_layers == 4  # without a model: up to the highest layer present


def test_gguf_damaged_or_foreign(tmp_path):
    import gguf

    f = tmp_path / "cv.gguf"
    export_gguf(_vs(), f)
    data = f.read_bytes()
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(SteerdeskError, match="trunc.gguf"):
        load_vectors(bad)
    bad.write_bytes(b"not a gguf")
    with pytest.raises(SteerdeskError, match="trunc.gguf"):
        load_vectors(bad)
    model = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(model), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, HIDDEN), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SteerdeskError, match="not a control vector"):
        import_gguf(model)


def test_gguf_export_needs_two_layers(tmp_path):
    with pytest.raises(SteerdeskError, match="no slot for block 0"):
        export_gguf(_vs(layers=1), tmp_path / "one.gguf")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_computed_vectors_survive_both_file_formats(tiny, tmp_path):
    from steerdesk.core.datasets import Dataset, Example
    from steerdesk.core.extract import compute_vectors
    from steerdesk.core.generate import SamplingSettings, generate
    from steerdesk.core.steering import steers_for

    ds = Dataset([Example("q", "yes indeed", "no way"), Example("r", "fine thanks", "terrible")], name="d")
    vs = compute_vectors(tiny, ds)
    save_vectors(vs, tmp_path / "v.safetensors")
    export_gguf(vs, tmp_path / "v.gguf")
    from_st = load_vectors(tmp_path / "v.safetensors")
    from_gguf = load_vectors(tmp_path / "v.gguf")
    for back in (from_st, from_gguf):
        back.check_compatible(tiny.info)
    assert torch.equal(from_st.directions, vs.directions)
    assert torch.equal(from_gguf.directions[1:], vs.directions[1:])
    sampling = SamplingSettings(max_new_tokens=6)
    runs = [generate(tiny, ["Hello"], steers_for(d, [2], scale=20.0), sampling=sampling)[0].token_ids
            for d in (vs.directions, from_st.directions, from_gguf.directions)]
    assert runs[0] == runs[1] == runs[2]
