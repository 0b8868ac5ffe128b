"""Faults and bad input at the core: each ends in one SteerdeskError sentence, and nothing is left broken."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tinylm import steerdesk_hooks

from steerdesk.core.datasets import Dataset, Example, load_bundled
from steerdesk.core.errors import SteerdeskError
from steerdesk.core.extract import compute_vectors
from steerdesk.core.generate import SamplingSettings, generate
from steerdesk.core.models import load_model
from steerdesk.core.steering import Steer, steers_for

SMALL = Dataset([Example("Hi?", "Hello, how can I help?", "Ugh, what now?"),
                 Example("Time?", "It is noon.", "Look at a clock, genius.")], name="small")


def _oom_hook(*_args):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.fixture
def llama(fresh_tiny):
    return fresh_tiny("llama")


def test_oom_during_compute_is_reported_and_model_stays_usable(llama):
    handle = llama.blocks[1].register_forward_hook(_oom_hook)
    with pytest.raises(SteerdeskError, match=r"Out of memory while extracting.*batch size"):
        compute_vectors(llama, SMALL, batch_size=4)
    handle.remove()
    assert all(not steerdesk_hooks(b) for b in llama.blocks)
    vs = compute_vectors(llama, SMALL, batch_size=4)  # usable again
    assert torch.isfinite(vs.directions).all()


def test_oom_during_generation_is_reported_and_model_stays_usable(llama):
    handle = llama.blocks[2].register_forward_hook(_oom_hook)
    steer = steers_for(torch.randn(4, 64), [1])
    with pytest.raises(SteerdeskError, match="Out of memory while generating"):
        generate(llama, ["hello"], steer, sampling=SamplingSettings(max_new_tokens=4))
    handle.remove()
    assert all(not steerdesk_hooks(b) for b in llama.blocks) and not llama.model._forward_pre_hooks
    assert len(generate(llama, ["hello"], steer, sampling=SamplingSettings(max_new_tokens=4))[0].token_ids) == 4


def test_nan_logits_under_absurd_scale_name_layer_and_scale(llama):
    huge = torch.full((64,), 1e35)
    with pytest.raises(SteerdeskError, match=r"NaN or infinite.*layer 1 x10000"):
        generate(llama, ["hello"], [Steer(1, huge, scale=1e4)], sampling=SamplingSettings(max_new_tokens=4))
    assert all(not steerdesk_hooks(b) for b in llama.blocks)


@pytest.mark.parametrize("scale, fragment", [(float("nan"), "finite"), (float("inf"), "finite"),
                                             (1e6, "absurd"), (-1e6, "absurd")])
def test_absurd_scales_refused(llama, scale, fragment):
    with pytest.raises(SteerdeskError, match=fragment):
        generate(llama, ["hello"], [Steer(1, torch.ones(64), scale=scale)])


@pytest.mark.parametrize("layer", [-1, 4, 99])
def test_layers_out_of_range(llama, layer):
    with pytest.raises(SteerdeskError, match="out of range"):
        generate(llama, ["hello"], [Steer(layer, torch.ones(64))])


@pytest.mark.parametrize("bad", [torch.tensor([float("nan")] * 64), torch.tensor([float("inf")] * 64)])
def test_non_finite_vectors_refused(llama, bad):
    with pytest.raises(SteerdeskError, match="NaN or infinite"):
        generate(llama, ["hello"], [Steer(1, bad)])


@pytest.mark.parametrize("examples, fragment", [
    ([], "empty"),
    ([Example("p", "", "t")], "base is empty"),
    ([Example("p", "b", "")], "target is empty"),
    ([Example("p", "  ", "  ")], "both empty"),
])
def test_unusable_datasets_refused(llama, examples, fragment):
    with pytest.raises(SteerdeskError, match=fragment):
        compute_vectors(llama, Dataset(examples, name="d"))


def test_unpaired_lists_work_for_mean_diff_but_not_pca(llama):
    ds = Dataset([Example("", "a polite line", "a rude line"), Example("", "another polite line", "")],
                 name="lists", paired=False)
    assert compute_vectors(llama, ds).num_layers == 4
    with pytest.raises(SteerdeskError, match="PCA needs paired"):
        compute_vectors(llama, ds, method="pca")


def test_texts_longer_than_the_context_are_cut_from_the_left_with_a_warning(llama, caplog):
    long_reply = "word " * 2000  # the tiny model's context is 512 positions
    ds = Dataset([Example("q", long_reply + "polite end", "short rude"), Example("q", "fine", "meh")], name="long")
    with caplog.at_level("WARNING"):
        vs = compute_vectors(llama, ds)
    assert vs.metadata["truncated_examples"] == "1"
    assert any("cut from the left" in r.message for r in caplog.records)


def test_model_path_that_does_not_exist():
    with pytest.raises(SteerdeskError, match="does not exist"):
        load_model("./no/such/model")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SteerdeskError, match="no config.json"):
        load_model(str(tmp_path))


def test_folder_that_is_not_a_causal_lm(tmp_path, tokenizer):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(SteerdeskError, match="not a causal language model"):
        load_model(str(tmp_path))


def test_missing_hub_model_offline_is_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SteerdeskError) as info:
        load_model("some-org/model-that-is-not-cached")
    assert "not in the local Hugging Face cache" in str(info.value) and "\n" not in str(info.value)


def test_missing_hub_model_without_network_is_one_sentence(monkeypatch):
    from steerdesk.core import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(SteerdeskError, match="hub is unreachable"):
        load_model("some-org/model-that-is-not-cached")


def test_no_pickle_and_safe_torch_load_in_the_code():
    root = Path(__file__).resolve().parents[2] / "steerdesk"
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_trust_remote_code_is_off_by_default_and_warns(monkeypatch, caplog):
    import inspect

    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level("WARNING"), pytest.raises(SteerdeskError):
        load_model("some-org/not-cached", trust_remote_code=True)
    assert any("trust_remote_code" in r.message for r in caplog.records)


def test_bundled_datasets_are_valid():
    for name in ("neutral_rude", "assistant_golden_retriever", "formal_casual"):
        ds = load_bundled(name)
        ds.validate()
        assert len(ds) >= 48
