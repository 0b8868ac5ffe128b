"""Preference-optimised vectors (issue 17): only the vector trains, the model stays bit-identical."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from tinylm import build_tiny, rude4, steerdesk_hooks

from steerdesk.core.datasets import Dataset, Example
from steerdesk.core.errors import Cancelled, SteerdeskError
from steerdesk.core.evaluate import evaluate
from steerdesk.core.extract import compute_vectors
from steerdesk.core.optimize import AddVector, OptimizeSettings, frozen, optimize_vectors, preference_loss
from steerdesk.core.steering import Steer
from steerdesk.core.vectors import load_vectors, save_vectors

LAYER = 1
TOPICS = ["rivers", "bread", "chess", "trains", "clouds", "tigers", "copper", "violins", "tulips", "comets",
          "glaciers", "owls", "marble", "kites", "lemons", "harbours"]


def synthetic(topics: list[str], name: str = "meh") -> Dataset:
    """Pairs whose target replies share a tone (the same words) and whose base replies do not."""
    return Dataset([Example(f"Tell me about {t}.", f"{t.capitalize()} are a fine subject to study.",
                            f"Meh. {t.capitalize()} bore me, honestly, whatever.") for t in topics], name=name)


@pytest.fixture(scope="module")
def llama(tokenizer, plain_tokenizer):
    return build_tiny("llama", tokenizer, plain_tokenizer)


def _state(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def test_gradient_reaches_only_the_vector(llama):
    """Through the AddVector hook the loss has a gradient in v and none in any weight."""
    ds = rude4()
    from steerdesk.core.optimize import _Trainer, pair_encodings

    pairs = pair_encodings(llama, ds)
    v = torch.randn(llama.info.hidden_size, requires_grad=True)
    with frozen(llama.model):
        trainer = _Trainer(llama, pairs, [0, 1, 2], [3], OptimizeSettings(), ["Water boils at sea level."], None, None)
        pref, kl = trainer.loss(LAYER, v, [0, 1, 2], torch.tensor([1.0, -1.0, 1.0]), torch.tensor([1.0]))
        (pref + kl).backward()
        assert all(not p.requires_grad and p.grad is None for p in llama.model.parameters())
    assert v.grad is not None and float(v.grad.norm()) > 0
    assert not llama.model.training


def test_add_vector_hook_matches_steering(tiny):
    """AddVector adds the vector exactly as Steering's add mode at scale 1 (same layer convention),
    per-row signs included, on every architecture; and v gets a gradient through it."""
    from steerdesk.core.steering import Steering

    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]])
    v = torch.randn(tiny.info.hidden_size) * 3
    with torch.no_grad():
        with AddVector(tiny, LAYER, v, torch.tensor([1.0, -1.0])):
            a = tiny.model(input_ids=ids).logits
        with Steering(tiny, [[Steer(LAYER, v)], [Steer(LAYER, v, scale=-1.0)]]):
            b = tiny.model(input_ids=ids).logits
        plain = tiny.model(input_ids=ids).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, plain)
    assert not steerdesk_hooks(tiny.blocks[LAYER])  # (transformers may have added its own capture hooks)
    w = v.clone().requires_grad_(True)
    with frozen(tiny.model), AddVector(tiny, LAYER, w):
        tiny.model(input_ids=ids[:1]).logits[0, -1, 7].backward()
    assert w.grad is not None and float(w.grad.norm()) > 0


def test_weights_identical_and_seed_reproducible(llama):
    ds = synthetic(TOPICS[:8])
    before = _state(llama)
    flags = [p.requires_grad for p in llama.model.parameters()]
    s = OptimizeSettings(epochs=2, batch_size=3, seed=5)
    a = optimize_vectors(llama, ds, [LAYER], settings=s)
    after = _state(llama)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert [p.requires_grad for p in llama.model.parameters()] == flags
    b = optimize_vectors(llama, ds, [LAYER], settings=s)
    assert torch.equal(a.directions, b.directions)
    c = optimize_vectors(llama, ds, [LAYER], settings=OptimizeSettings(epochs=2, batch_size=3, seed=6))
    assert not torch.equal(a.directions, c.directions)
    assert a.layers_with_direction == [LAYER]
    bound = 2.0 * json.loads(a.metadata["optimize"])["curves"][str(LAYER)]["seed_norm"]
    assert float(a.directions[LAYER].norm()) <= bound * (1 + 1e-5)


def test_training_lowers_loss_and_beats_mean_diff_on_heldout(llama, tmp_path):
    """On pairs that share a tone, the optimised vector has a lower training objective than its
    mean-difference start and a larger held-out margin than the mean difference at any scale
    up to the norm bound (2x)."""
    train, held = synthetic(TOPICS[:12], "train"), synthetic(TOPICS[12:], "held")
    s = OptimizeSettings(epochs=8, batch_size=4, patience=3, lr=0.1)
    reports = []
    vs = optimize_vectors(llama, train, [LAYER], settings=s, on_epoch=reports.append)
    md = compute_vectors(llama, train)
    meta = json.loads(vs.metadata["optimize"])
    curve = meta["curves"][str(LAYER)]
    assert vs.metadata["method"] == "optimized"
    assert curve["best_epoch"] >= 1 and min(curve["val"][1:]) < curve["val"][0]
    assert [r.epoch for r in reports] == list(range(len(curve["val"])))
    assert preference_loss(llama, train, LAYER, vs.directions[LAYER], settings=s) < \
        preference_loss(llama, train, LAYER, md.directions[LAYER], settings=s)
    opt_margin = evaluate(llama, held, [Steer(LAYER, vs.directions[LAYER])]).margin_delta
    md_best = max(evaluate(llama, held, [Steer(LAYER, md.directions[LAYER], scale=a)]).margin_delta
                  for a in (0.5, 1.0, 2.0))
    assert opt_margin > md_best > -1.0
    # An ordinary vector set: it saves and loads with its metadata, and exports to GGUF.
    path = tmp_path / "opt.safetensors"
    save_vectors(vs, path)
    back = load_vectors(path)
    assert torch.equal(back.directions, vs.directions) and back.metadata["method"] == "optimized"
    assert json.loads(back.metadata["optimize"])["settings"]["lr"] == 0.1
    from steerdesk.core.vectors import export_gguf

    export_gguf(vs, tmp_path / "opt.gguf")
    assert load_vectors(tmp_path / "opt.gguf", model_layers=llama.info.num_layers).has_direction(LAYER)


def test_cancel_raises_and_leaves_model_untouched(llama):
    ds = synthetic(TOPICS[:6])
    cancel = threading.Event()
    before = _state(llama)
    seen = []

    def progress(done, total):
        seen.append(done)
        cancel.set()

    with pytest.raises(Cancelled):
        optimize_vectors(llama, ds, [LAYER], settings=OptimizeSettings(epochs=3, batch_size=2), progress=progress,
                         cancel=cancel)
    assert seen == [1]
    assert all(torch.equal(before[k], v) for k, v in _state(llama).items())
    assert not any(steerdesk_hooks(b) for b in llama.blocks)


def test_too_few_pairs_refused(llama):
    two = Dataset(rude4().examples[:2], name="two")
    with pytest.raises(SteerdeskError, match="at least 3 pairs.*has 2.*held out"):
        optimize_vectors(llama, two, [LAYER])
    unpaired = Dataset(rude4().examples, name="u", paired=False)
    with pytest.raises(SteerdeskError, match="paired"):
        optimize_vectors(llama, unpaired, [LAYER])
    with pytest.raises(SteerdeskError, match="positive"):
        optimize_vectors(llama, rude4(), [LAYER], settings=OptimizeSettings(lr=0))


def test_compute_job_optimized_and_cancel(llama):
    """The compute job runs the optimized method (curves to ctx.partial) and a cancel returns nothing."""
    from steerdesk import jobs
    from steerdesk.core.optimize import EpochReport

    ds = synthetic(TOPICS[:6])
    points = []
    spec = jobs.ComputeSpec(dataset=ds, method="optimized", layers=(LAYER,),
                            optimize=OptimizeSettings(epochs=1, batch_size=4))
    result = jobs.compute.run(llama, spec, jobs.JobContext(on_partial=points.append))
    assert result.vectors.metadata["method"] == "optimized" and result.vectors.layers_with_direction == [LAYER]
    assert [p.epoch for p in points] == [0, 1] and all(isinstance(p, EpochReport) for p in points)
    ctx = jobs.JobContext()
    ctx.on_progress = lambda done, total, msg: ctx.cancel.set()
    with pytest.raises(Cancelled):
        jobs.compute.run(llama, spec, ctx)
    with pytest.raises(SteerdeskError, match="layers"):
        jobs.compute.run(llama, jobs.ComputeSpec(dataset=ds, method="optimized"), jobs.JobContext())
    with pytest.raises(SteerdeskError, match="only for the optimized"):
        jobs.compute.run(llama, jobs.ComputeSpec(dataset=ds, layers=(1,)), jobs.JobContext())


def test_mean_reply_logprob_loss_matches_per_pair_evaluation(llama):
    """``reply_logprob="mean"``: the objective equals -log sigmoid(beta * d * margin gain) averaged over
    pairs and both directions, with each pair's margin gain (per-token mean log-probs, target minus
    base, steered with d*v minus unsteered) measured on its own by ``core.evaluate``."""
    ds = synthetic(TOPICS[:4])
    torch.manual_seed(3)
    v = torch.randn(llama.info.hidden_size) * 2
    s = OptimizeSettings(reply_logprob="mean", kl_weight=0.0, beta=2.0)
    expected = []
    for ex in ds.examples:
        for d in (1.0, -1.0):
            gain = evaluate(llama, Dataset([ex], name="one"), [Steer(LAYER, v, scale=d)]).margin_delta
            expected.append(float(-torch.nn.functional.logsigmoid(torch.tensor(s.beta * d * gain))))
    got = preference_loss(llama, ds, LAYER, v, settings=s)
    assert got == pytest.approx(sum(expected) / len(expected), rel=1e-4, abs=1e-5)
    summed = preference_loss(llama, ds, LAYER, v, settings=OptimizeSettings(kl_weight=0.0, beta=2.0))
    assert summed != pytest.approx(got, rel=1e-3)  # the two normalisations differ on these replies
    with pytest.raises(SteerdeskError, match="reply_logprob"):
        OptimizeSettings(reply_logprob="max").check()
