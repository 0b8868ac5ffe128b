"""Held-out scores: margin / fluency / KL against hand-computed references, padding, cancel, errors."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from tinylm import random_vectors, rude4

from steerdesk.core.datasets import Dataset, Example
from steerdesk.core.errors import Cancelled, SteerdeskError
from steerdesk.core.evaluate import NEUTRAL_TEXTS, evaluate, make_layouts, prepare_texts
from steerdesk.core.extract import encode
from steerdesk.core.steering import Steering, steers_for

PAIRS = Dataset(rude4().examples[:3] + [Example("", "A reply with no prompt at all.", "Whatever, no prompt either.")],
                name="unit")

# Checks that do not depend on the architecture run on one chat-template and one plain-text model.
TWO_ARCHS = pytest.mark.parametrize("arch", ["llama", "gpt2"])


def _reference_logprob(lm, prompt, reply, steers=(), positions_generated=False):
    """Mean log-prob per reply token of one text, unbatched and unpadded (the definition)."""
    (e,) = encode(lm, [(prompt, reply)])
    ids = torch.tensor([e.ids])
    kwargs = {"prompt_length": e.reply_start} if positions_generated else {}
    with Steering(lm, list(steers), **kwargs), torch.inference_mode():
        logp = lm.model(input_ids=ids).logits[0].float().log_softmax(-1)
    first = max(e.reply_start, 1)
    toks = torch.tensor(e.ids[first:])
    return float(logp[first - 1:len(e.ids) - 1].gather(-1, toks[:, None]).mean())


def _reference_scores(lm, ds, steers=(), generated=False):
    base = [_reference_logprob(lm, e.prompt, e.base, steers, generated) for e in ds.examples]
    target = [_reference_logprob(lm, e.prompt, e.target, steers, generated) for e in ds.examples]
    margin = sum(t - b for t, b in zip(target, base)) / len(base)
    fluency = (sum(base) + sum(target)) / (len(base) + len(target))
    return margin, fluency


def test_unsteered_scores_match_the_definition(tiny):
    ev = evaluate(tiny, PAIRS, [], batch_size=3)
    margin, fluency = _reference_scores(tiny, PAIRS)
    assert ev.unsteered.margin == pytest.approx(margin, abs=1e-5)
    assert ev.unsteered.fluency == pytest.approx(fluency, abs=1e-5)
    assert ev.n_pairs == 4
    assert ev.margin_delta == 0.0 and ev.fluency_delta == 0.0


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_steered_scores_match_the_definition(tiny, positions):
    v = random_vectors(tiny, scale=0.5)
    steers = steers_for(v, [1, 2], scale=2.0, positions=positions)
    ev = evaluate(tiny, PAIRS, steers, batch_size=3)
    margin, fluency = _reference_scores(tiny, PAIRS, steers, generated=positions == "generated")
    m0, f0 = _reference_scores(tiny, PAIRS)
    assert ev.steered.margin == pytest.approx(margin, abs=1e-5)
    assert ev.steered.fluency == pytest.approx(fluency, abs=1e-5)
    assert ev.margin_delta == pytest.approx(margin - m0, abs=1e-5)
    assert ev.fluency_delta == pytest.approx(fluency - f0, abs=1e-5)
    assert abs(ev.fluency_delta) > 1e-4  # the vector is strong enough to matter


@TWO_ARCHS
def test_batch_size_and_padding_do_not_matter(tiny):
    v = random_vectors(tiny, scale=0.5)
    steers = steers_for(v, [2], scale=1.5)
    a = evaluate(tiny, PAIRS, steers, batch_size=1)
    b = evaluate(tiny, PAIRS, steers, batch_size=8, max_rows=8)
    assert a.steered.margin == pytest.approx(b.steered.margin, abs=1e-5)
    assert a.steered.fluency == pytest.approx(b.steered.fluency, abs=1e-5)


@TWO_ARCHS
def test_layout_aligns_replies(tiny):
    texts = prepare_texts(tiny, PAIRS)
    (lay,) = [x for x in make_layouts(tiny, texts, batch_size=16) if x.kind == "heldout"]
    for row, t in enumerate(lay.texts):
        e = texts.encoded[t]
        off = lay.reply_col - e.reply_start
        assert lay.ids[row, off:off + len(e.ids)].tolist() == e.ids
        assert lay.mask[row].sum() == len(e.ids)
        # Position ids count real tokens only, whatever the padding on either side.
        assert lay.positions[row, off:off + len(e.ids)].tolist() == list(range(len(e.ids)))
        assert int(lay.counts[row]) == len(e.ids) - max(e.reply_start, 1)
    assert int(lay.counts.sum()) == lay.n_tokens


@TWO_ARCHS
def test_scale_zero_gives_exactly_zero_and_a_zero_vector_is_refused(tiny):
    v = random_vectors(tiny, scale=0.5)
    ev = evaluate(tiny, PAIRS, steers_for(v, [1], scale=0.0), neutral=NEUTRAL_TEXTS[:2])
    assert abs(ev.margin_delta) < 1e-5 and abs(ev.fluency_delta) < 1e-5 and abs(ev.kl) < 1e-6
    # A zero direction at a non-zero scale would be a silent no-op (issue 10): refused, never scored as 0.
    with pytest.raises(SteerdeskError, match="no steering direction"):
        evaluate(tiny, PAIRS, steers_for(torch.zeros_like(v), [1], scale=3.0), neutral=NEUTRAL_TEXTS[:2])


@TWO_ARCHS
def test_kl_matches_the_definition(tiny):
    v = random_vectors(tiny, scale=0.5)
    steers = steers_for(v, [1], scale=2.0)
    text = NEUTRAL_TEXTS[0]
    ev = evaluate(tiny, PAIRS, steers, neutral=[text])
    (e,) = encode(tiny, [("", text)])
    ids = torch.tensor([e.ids])
    with torch.inference_mode():
        p = tiny.model(input_ids=ids).logits[0].float().log_softmax(-1)
        with Steering(tiny, steers):
            q = tiny.model(input_ids=ids).logits[0].float().log_softmax(-1)
    first = max(e.reply_start, 1)
    p, q = p[first - 1:len(e.ids) - 1], q[first - 1:len(e.ids) - 1]
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert ev.kl == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert ev.kl > 0 and ev.unsteered.kl == 0.0


@TWO_ARCHS
def test_no_kl_without_neutral_texts(tiny):
    ev = evaluate(tiny, PAIRS, [])
    assert ev.kl is None and ev.to_dict()["kl"] is None


@TWO_ARCHS
def test_progress_and_cancel(tiny):
    seen = []
    evaluate(tiny, PAIRS, steers_for(random_vectors(tiny), [1]), batch_size=2,
             progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == list(range(1, len(seen) + 1))
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        evaluate(tiny, PAIRS, [], cancel=stop)


@TWO_ARCHS
def test_errors(tiny):
    with pytest.raises(SteerdeskError, match="base and one target"):
        evaluate(tiny, Dataset([Example("p", "only a base", "")], name="half", paired=False), [])
    with pytest.raises(SteerdeskError, match="at least 1"):
        evaluate(tiny, PAIRS, [], max_pairs=0)
    with pytest.raises(SteerdeskError, match="Batch size"):
        evaluate(tiny, PAIRS, [], batch_size=0)


@TWO_ARCHS
def test_max_pairs_keeps_the_first_rows(tiny):
    ev = evaluate(tiny, PAIRS, [], max_pairs=2)
    sub = Dataset(PAIRS.examples[:2], name="first two")
    margin, _ = _reference_scores(tiny, sub)
    assert ev.n_pairs == 2 and ev.unsteered.margin == pytest.approx(margin, abs=1e-5)


def _packed_scores(lm, texts, steers=(), generated=False, **kw):
    """Per-text mean log-probs from the model's own forward over packed layouts (custom 4D mask)."""
    from steerdesk.core.evaluate import make_packed_layouts, model_logits, score_tokens, vocab_size

    lays = make_packed_layouts(lm, texts, positions="generated" if generated else "all", **kw)
    assert lays is not None
    got = torch.full((len(texts),), float("nan"), dtype=torch.float64)
    for lay in lays:
        with Steering(lm, list(steers), prompt_length=lay.reply_col if generated else None), torch.inference_mode():
            logits, lo = model_logits(lm, lay.ids, lay.model_mask, lay.positions, lay.keep())
        lp, _ = score_tokens(lay, 1, lambda r, c: logits[r, c - lo], vocab_size(lm))
        got[lay.texts] = lp
    return got, lays


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "gpt2", "gptneox"])
@pytest.mark.parametrize("generated", [False, True])
def test_packed_layout_scores_each_text_as_if_alone(tiny, generated):
    """Texts sharing a prompt share its tokens in one row, yet every reply scores as in its own forward."""
    # Prompts with a common lead-in: a model without a chat template (no system part) shares it too,
    # so every architecture packs several pairs in a row behind one shared prefix.
    ds = Dataset([Example("Please answer this: " + e.prompt, e.base, e.target) for e in rude4().examples]
                 + [Example("Please answer this: another question?", "A calm answer.", "A rude answer, obviously.")],
                 name="pk")
    # Plain formatting gives an empty prompt no token: packed only when steering every position.
    neutral = NEUTRAL_TEXTS[:3] if not (generated and tiny.info.architecture.lower().startswith("gpt")) else ()
    texts = prepare_texts(tiny, ds, neutral=neutral)
    steers = steers_for(random_vectors(tiny, scale=0.5), [1], scale=1.5, positions="generated" if generated else "all")
    row_tokens = sum(len(texts.encoded[i].ids) for i in texts.indices("base", "target")) // 4
    got, lays = _packed_scores(tiny, texts, steers, generated, row_tokens=row_tokens)
    held = [lay for lay in lays if lay.kind == "heldout"]
    # Several rows, and rows holding several pairs (shared prompt tokens, shared system prefix).
    assert sum(lay.rows for lay in held) >= 2 and max(lay.n_segments / lay.rows for lay in held) >= 3
    scored = texts.indices("base", "target")
    assert sum(int(lay.mask.sum()) for lay in held) < sum(len(texts.encoded[i].ids) for i in scored)
    # A row holds its texts' common prefix once, each distinct prompt's rest once, and each reply but
    # its last token (scored from the column before; its own column is a dead end).
    for lay in held:
        for r in range(lay.rows):
            members = [i for s, i in enumerate(lay.texts) if lay.seg_row[s] == r]
            starts = [max(texts.encoded[i].reply_start, 1) for i in members]
            prompts = list(dict.fromkeys(tuple(texts.encoded[i].ids[:st]) for i, st in zip(members, starts)))
            c = min(len(os.path.commonprefix([list(p) for p in prompts])), min(map(len, prompts)) - 1) \
                if len(prompts) > 1 else 0
            want = c + sum(len(p) - c for p in prompts) + sum(len(texts.encoded[i].ids) - st - 1
                                                              for i, st in zip(members, starts))
            assert int(lay.mask[r].sum()) == want
    if not generated:
        # Steering every position: flat rows (no left padding, a reply right after its prompt), and
        # no more token slots than rows aligned at the reply column.
        from steerdesk.core.evaluate import make_packed_layouts

        assert all(lay.flat and bool(lay.mask[:, 0].all()) and lay.prompt_length is None for lay in lays)
        held_texts = prepare_texts(tiny, ds)  # (aligned rows refuse a neutral text with no prompt token)
        flat = make_packed_layouts(tiny, held_texts, row_tokens=row_tokens)
        aligned = make_packed_layouts(tiny, held_texts, positions="mixed", row_tokens=row_tokens)
        assert flat is not None and aligned is not None and not any(lay.flat for lay in aligned)
        assert sum(lay.ids.numel() for lay in flat) <= sum(lay.ids.numel() for lay in aligned)
    pairs = [(e.prompt, e.base) for e in ds.examples] + [(e.prompt, e.target) for e in ds.examples] \
        + [("", t) for t in neutral]
    for i, (prompt, reply) in enumerate(pairs):
        want = _reference_logprob(tiny, prompt, reply, steers, generated)
        assert float(got[i]) == pytest.approx(want, abs=1e-5), (i, prompt, reply)


@pytest.mark.parametrize("arch", ["gemma2"])
def test_no_packing_beyond_a_sliding_window(tiny):
    """Packing stretches column distances: a sliding-window model whose window a row exceeds is not packed."""
    from steerdesk.core.evaluate import make_packed_layouts

    texts = prepare_texts(tiny, PAIRS)
    assert min(len(e.ids) for e in texts.encoded) > tiny.model.config.sliding_window
    assert make_packed_layouts(tiny, texts) is None


@TWO_ARCHS
def test_workspace_scores_equal_fresh_tensors_and_reuse_one_buffer(tiny):
    """Scoring through a Workspace (reused log-softmax / KL / head / picked-logits buffers) gives the
    same numbers as fresh tensors, bit for bit, and the second call writes into the first call's memory."""
    from steerdesk.core.evaluate import (
        Workspace,
        logits_picker,
        model_logits,
        reference_logprobs,
        score_tokens,
        vocab_size,
    )
    from steerdesk.core.prefix import Tail

    texts = prepare_texts(tiny, PAIRS, neutral=NEUTRAL_TEXTS[:3])
    vocab = vocab_size(tiny)
    tail = Tail(tiny)
    ws = Workspace()
    for lay in make_layouts(tiny, texts, batch_size=8):
        with torch.inference_mode():
            logits, lo = model_logits(tiny, lay.ids, lay.mask, lay.positions, lay.keep())
            ref = reference_logprobs(lay, logits_picker(logits, lo), vocab) if lay.kind == "neutral" else None
            # The KL reference is of other (perturbed) log-probs, so the KL terms are not all zero.
            ref = None if ref is None else (ref + 0.1 * torch.randn_like(ref)).log_softmax(-1)
            fresh = score_tokens(lay, 1, logits_picker(logits, lo), vocab, ref)
            reused = [score_tokens(lay, 1, logits_picker(logits, lo, ws), vocab, ref, ws) for _ in range(2)]
        for got in reused:
            assert torch.equal(got[0], fresh[0])
            assert (got[1] is None) == (ref is None) and (ref is None or torch.equal(got[1], fresh[1]))
        if ref is not None:
            assert float(fresh[1].abs().max()) > 1e-4
    ptr = ws.take("logp", (2, vocab), torch.float32, torch.device("cpu")).data_ptr()
    assert ws.take("logp", (1, vocab), torch.float32, torch.device("cpu")).data_ptr() == ptr  # reused
    assert ws.take("logp", (10_000, vocab), torch.float32, torch.device("cpu")).shape == (10_000, vocab)  # grown
    # The head written into a given buffer equals the head module's own output.
    h = torch.randn(5, tiny.info.hidden_size)
    out = torch.empty(5, vocab)
    with torch.inference_mode():
        got = tail.logits(h, out)
        assert torch.equal(got, tail.logits(h))
    assert type(tail.head) is not torch.nn.Linear or got.data_ptr() == out.data_ptr()
