"""Reading block outputs: the layer convention, padding independence, vectors from datasets."""

from __future__ import annotations

import threading

import pytest
import torch
from tinylm import NUM_LAYERS, PROMPT, REPLY

from steerdesk.core.datasets import Dataset, Example
from steerdesk.core.errors import Cancelled, SteerdeskError
from steerdesk.core.extract import collect, compute_vectors, encode

PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Hi", "Hello! How can I help you today? I can answer questions about many topics."),
    ("Name a colour.", "Blue."),
    ("", "A reply without any prompt at all, a little longer than the others."),
]


def _hidden_states(lm, ids):
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states


def test_layer_convention_matches_hidden_states(tiny):
    """collect() layer L == hidden_states[L + 1] (block L's output), read at the last token."""
    enc = encode(tiny, [(PROMPT, REPLY)])
    reads, norms = collect(tiny, enc, read="last")
    assert reads.shape == (1, NUM_LAYERS, tiny.info.hidden_size)
    assert reads.dtype == torch.float32
    hs = _hidden_states(tiny, enc[0].ids)
    assert len(hs) == NUM_LAYERS + 1
    for layer in range(NUM_LAYERS - 1):
        torch.testing.assert_close(reads[0, layer], hs[layer + 1][0, -1], atol=1e-5, rtol=1e-5)
        # The embedding output (hidden_states[0]) is never a "layer".
        assert not torch.allclose(reads[0, layer], hs[layer][0, -1], atol=1e-5)
        torch.testing.assert_close(norms[0, layer], hs[layer + 1][0, -1].norm(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama"])
def test_last_layer_is_before_the_final_norm(tiny, arch):
    enc = encode(tiny, [(PROMPT, REPLY)])
    reads, _ = collect(tiny, enc)
    hs = _hidden_states(tiny, enc[0].ids)
    last = reads[0, -1]
    final = hs[-1][0, -1]
    assert not torch.allclose(last, final, atol=1e-3), "hidden_states[-1] is after the final norm"
    # ...and applying the final norm to block N-1's output gives hidden_states[-1].
    with torch.inference_mode():
        normed = tiny.model.model.norm(last)
    torch.testing.assert_close(normed, final, atol=1e-5, rtol=1e-5)


def test_mean_read_is_the_mean_over_reply_tokens(tiny):
    enc = encode(tiny, [(PROMPT, REPLY)])
    e = enc[0]
    assert 0 < e.reply_start < len(e.ids)
    reads, norms = collect(tiny, enc, read="mean")
    hs = _hidden_states(tiny, e.ids)
    for layer in range(NUM_LAYERS - 1):
        block = hs[layer + 1][0, e.reply_start:]
        torch.testing.assert_close(reads[0, layer], block.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(norms[0, layer], block.norm(dim=-1).mean(), atol=1e-5, rtol=1e-5)


def test_reply_start_marks_the_reply_tokens(tiny):
    for prompt, reply in PAIRS:
        e = encode(tiny, [(prompt, reply)])[0]
        reply_text = tiny.tokenizer.decode(e.ids[e.reply_start:])
        assert reply_text.strip() == reply.strip()
        assert tiny.tokenizer.decode(e.ids).endswith(reply)  # the last token is content


def test_collect_layer_subset(tiny):
    enc = encode(tiny, PAIRS[:2])
    full, _ = collect(tiny, enc)
    part, _ = collect(tiny, enc, layers=[2, 0])
    assert part.shape == (2, 2, tiny.info.hidden_size)
    torch.testing.assert_close(part[:, 0], full[:, 2], atol=1e-6, rtol=0)
    torch.testing.assert_close(part[:, 1], full[:, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("read", ["last", "mean"])
def test_left_and_right_padding_agree(tiny, read):
    enc = encode(tiny, PAIRS)
    assert len({len(e.ids) for e in enc}) >= 3, "examples of different lengths"
    left, left_n = collect(tiny, enc, read=read, padding_side="left", batch_size=4)
    right, right_n = collect(tiny, enc, read=read, padding_side="right", batch_size=4)
    alone = torch.cat([collect(tiny, [e], read=read)[0] for e in enc])
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    for got in (left, right):
        rel = (got - alone).norm(dim=-1) / alone.norm(dim=-1)
        assert rel.max() < 1e-4, f"padded batch differs from unpadded (max rel {rel.max():.2e})"
    rel = (left - right).norm(dim=-1) / right.norm(dim=-1)
    assert rel.max() < 1e-4
    torch.testing.assert_close(left_n, right_n, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("read", ["last", "mean"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_non_finite_pad_states_do_not_leak_into_reads(fresh_tiny, read, side):
    """A block output at pad positions may be inf/NaN (fully masked rows); reads must not see it.

    Only the last block is poisoned: earlier NaN would flow on through attention values.
    """
    lm = fresh_tiny("llama")
    enc = encode(lm, PAIRS)
    clean, clean_n = collect(lm, enc, read=read, padding_side=side, batch_size=4)
    base = getattr(lm.model, "base_model", lm.model)
    seen: dict[str, torch.Tensor] = {}

    def keep_mask(module, args, kwargs):
        seen["mask"] = kwargs["attention_mask"]

    def poison(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.masked_fill((seen["mask"] == 0).unsqueeze(-1), float("nan"))
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handles = [base.register_forward_pre_hook(keep_mask, with_kwargs=True)]
    handles.append(lm.blocks[-1].register_forward_hook(poison))
    try:
        poisoned, poisoned_n = collect(lm, enc, read=read, padding_side=side, batch_size=4)
    finally:
        for h in handles:
            h.remove()
    assert (seen["mask"] == 0).any(), "the batch must contain padding for this test to mean anything"
    assert torch.isfinite(poisoned).all() and torch.isfinite(poisoned_n).all()
    torch.testing.assert_close(poisoned, clean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(poisoned_n, clean_n, rtol=1e-4, atol=1e-5)


def test_collect_under_steering_reads_steered_states(tiny):
    """Extraction hooks registered inside a Steering block see the steered block output."""
    from steerdesk.core.steering import Steering, steers_for

    enc = encode(tiny, [(PROMPT, REPLY)])
    plain, _ = collect(tiny, enc)
    v = torch.randn(NUM_LAYERS, tiny.info.hidden_size) * 0.1
    with Steering(tiny, steers_for(v, [1])):
        steered, _ = collect(tiny, enc)
    torch.testing.assert_close(steered[0, 1] - plain[0, 1], v[1], atol=1e-5, rtol=0)
    assert torch.equal(steered[0, 0], plain[0, 0])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_long_examples_are_cut_from_the_left(tiny, caplog):
    long_reply = " ".join(["word"] * 700)  # beyond the 512-position context
    with caplog.at_level("WARNING"):
        enc = encode(tiny, [("A prompt", long_reply), ("p", "short")])
    assert "cut from the left" in caplog.text
    assert enc[0].truncated and len(enc[0].ids) == 512 and enc[0].reply_start == 0
    assert not enc[1].truncated
    for read in ("last", "mean"):
        reads, _ = collect(tiny, enc, read=read)
        assert torch.isfinite(reads).all()


def test_collect_keeps_example_order_and_reports_progress(tiny):
    enc = encode(tiny, PAIRS)
    seen = []
    batched, _ = collect(tiny, enc, batch_size=3, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(3, 4), (4, 4)]
    for i, e in enumerate(enc):
        one, _ = collect(tiny, [e])
        torch.testing.assert_close(batched[i], one[0], atol=1e-5, rtol=1e-4)


def test_collect_cancel_and_bad_settings(tiny):
    enc = encode(tiny, PAIRS)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        collect(tiny, enc, cancel=stop)
    with pytest.raises(SteerdeskError, match="read position"):
        collect(tiny, enc, read="first")
    with pytest.raises(SteerdeskError, match="Batch size"):
        collect(tiny, enc, batch_size=0)
    assert not any(b._forward_hooks and any("steerdesk" in getattr(h, "__module__", "")
                                            for h in b._forward_hooks.values()) for b in tiny.blocks)


def _tiny_dataset() -> Dataset:
    return Dataset([
        Example("How are you?", "I am fine, thank you.", "None of your business."),
        Example("Pass the salt.", "Here you go.", "Get it yourself."),
        Example("What time is it?", "It is three o'clock.", "Buy a watch."),
    ], name="tiny")


@pytest.mark.parametrize("read", ["last", "mean"])
def test_mean_diff_vector_definition(tiny, read):
    ds = _tiny_dataset()
    vs = compute_vectors(tiny, ds, read=read, keep_reads=True)
    assert vs.directions.shape == (NUM_LAYERS, tiny.info.hidden_size)
    base, _ = collect(tiny, encode(tiny, ds.base_texts), read=read)
    target, _ = collect(tiny, encode(tiny, ds.target_texts), read=read)
    torch.testing.assert_close(vs.directions, target.mean(0) - base.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(vs.extraction.base, base, atol=1e-5, rtol=1e-4)
    assert vs.proj_base.shape == (NUM_LAYERS, 3) and vs.proj_target.shape == (NUM_LAYERS, 3)
    assert (vs.proj_target.mean(1) > vs.proj_base.mean(1)).all()  # target side is positive
    m = vs.metadata
    for key in ("format", "model", "architecture", "num_layers", "hidden_size", "method", "read_position",
                "layer_convention", "dataset_sha256", "created", "steerdesk_version"):  # DESIGN.md section 3
        assert m.get(key), key
    assert m["format"] == "steerdesk.vectors/1" and m["method"] == "mean-diff"
    assert m["layer_convention"] == "block_output" and m["read_position"] == read
    assert m["num_layers"] == str(NUM_LAYERS) and m["architecture"] == tiny.info.architecture
    assert m["dataset_sha256"] == ds.sha256()
    assert torch.all(vs.norms > 0)


def test_pca_vector_points_to_target(tiny):
    vs = compute_vectors(tiny, _tiny_dataset(), method="pca")
    md = compute_vectors(tiny, _tiny_dataset(), method="mean-diff")
    cos = torch.nn.functional.cosine_similarity(vs.directions, md.directions, dim=-1)
    assert (cos > 0).all()


def test_compute_vectors_refuses_bad_input(tiny):
    with pytest.raises(SteerdeskError, match="empty"):
        compute_vectors(tiny, Dataset([], name="e"))
    with pytest.raises(SteerdeskError, match="method"):
        compute_vectors(tiny, _tiny_dataset(), method="ica")
    unpaired = Dataset([Example("", "a", "b"), Example("", "c", "")], paired=False)
    with pytest.raises(SteerdeskError, match="PCA needs paired"):
        compute_vectors(tiny, unpaired, method="pca")


def test_collect_chosen_layers_negative_and_out_of_range(tiny):
    enc = encode(tiny, PAIRS[:2])
    every, _ = collect(tiny, enc)
    some, _ = collect(tiny, enc, layers=[-1, 0])
    torch.testing.assert_close(some[:, 0], every[:, NUM_LAYERS - 1], rtol=0, atol=0)
    torch.testing.assert_close(some[:, 1], every[:, 0], rtol=0, atol=0)
    with pytest.raises(SteerdeskError, match="Layer 99 does not exist"):
        collect(tiny, enc, layers=[99])
