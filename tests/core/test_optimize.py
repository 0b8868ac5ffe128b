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


# ============================================================== prefix cache (issue 17: training time)

def _trainer(lm, ds, cache: bool, settings: OptimizeSettings | None = None, layer: int = LAYER):
    from steerdesk.core.optimize import _split, _Trainer, pair_encodings

    s = settings or OptimizeSettings(batch_size=3)
    pairs = pair_encodings(lm, ds)
    train, val = _split(len(pairs), s)
    return _Trainer(lm, pairs, train, val, s, ["Water boils at sea level.", "The train leaves at nine today."],
                    None, None, cache_layers=[layer] if cache else ())


def _loss_and_grad(trainer, layer, v, idx, dirs, kl_signs):
    w = v.clone().requires_grad_(True)
    pref, kl = trainer.loss(layer, w, idx, dirs, kl_signs)
    (pref + 0.7 * kl).backward()
    return float(pref.detach()), float(kl.detach()), w.grad.clone()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "gpt2", "gptneox"])
@pytest.mark.parametrize("layer", [1, 3])  # 3: the last block (no block runs after it, only the tail)
def test_prefix_cache_same_losses_and_gradient_as_hooks(arch, layer, tokenizer, plain_tokenizer):
    """The prefix-cache path (recorded block-L outputs, blocks L+1..end + norm + head on the scored tokens)
    gives the hook path's preference loss, KL term and gradient in v (float32, ~1e-5 relative), on
    batches of different padded widths, with both reply normalisations, with each pair packed in one
    row (base and target sharing the prompt) and with one text per row."""
    lm = build_tiny(arch, tokenizer, plain_tokenizer)
    ds = Dataset([Example(f"Tell me about {t}{'!' * (i % 3)}.", f"{t.capitalize()} are fine." + " Yes." * (i % 4),
                          f"Meh. {t} bore me." + " Whatever." * (i % 3)) for i, t in enumerate(TOPICS[:9])],
                 name="mixed")
    torch.manual_seed(1)
    for mean in ("sum", "mean"):
        s = OptimizeSettings(batch_size=3, reply_logprob=mean)
        with frozen(lm.model):
            trainer = _trainer(lm, ds, True, s, layer)
            seed = torch.randn(lm.info.hidden_size) * 2
            assert trainer.scorer.prepare(layer, seed, trainer.train) == "prefix"
            fmt = trainer.scorer.pack
            assert fmt == "additive"  # tiny models use eager attention: packed rows with an additive 4D mask
            for idx in ([0, 4, 7], [2, 3], [8]):
                dirs = torch.tensor([1.0, -1.0, 1.0][:len(idx)])
                kl_signs = torch.tensor([1.0, -1.0])
                v = torch.randn(lm.info.hidden_size) * 2
                trainer.scorer.paths[layer] = "hooks"
                want = _loss_and_grad(trainer, layer, v, idx, dirs, kl_signs)
                trainer.scorer.paths[layer] = "prefix"
                for pack in (fmt, None):  # each pair packed in one row (shared prompt), and one text per row
                    trainer.scorer.pack = pack
                    got = _loss_and_grad(trainer, layer, v, idx, dirs, kl_signs)
                    assert got[0] == pytest.approx(want[0], rel=1e-5, abs=1e-6)
                    assert got[1] == pytest.approx(want[1], rel=1e-5, abs=1e-7)
                    assert float((got[2] - want[2]).norm()) <= 1e-5 * float(want[2].norm()) + 1e-8
                trainer.scorer.pack = fmt
            trainer.scorer.paths[layer] = "prefix"
            a = trainer.full_loss(layer, v, trainer.val)
            trainer.scorer.paths[layer] = "hooks"
            assert a == pytest.approx(trainer.full_loss(layer, v, trainer.val), rel=1e-5)
        assert all(p.grad is None for p in lm.model.parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_with_cache_gives_the_same_vector(arch, tokenizer, plain_tokenizer):
    """Same seed, with and without the prefix cache: the same curves and vector up to float rounding;
    the model's weights stay bit-identical and no hook is left behind."""
    lm = build_tiny(arch, tokenizer, plain_tokenizer)
    before = _state(lm)
    ds = synthetic(TOPICS[:10])
    s = OptimizeSettings(epochs=3, batch_size=3, patience=3, seed=2)
    a = optimize_vectors(lm, ds, [1, 2], settings=s)
    b = optimize_vectors(lm, ds, [1, 2], settings=s, prefix_cache=False)
    ca, cb = (json.loads(x.metadata["optimize"])["curves"] for x in (a, b))
    assert [ca[k]["path"] for k in ("1", "2")] == ["prefix", "prefix"]
    assert [cb[k]["path"] for k in ("1", "2")] == ["hooks", "hooks"]
    for k in ("1", "2"):
        assert ca[k]["val"] == pytest.approx(cb[k]["val"], rel=1e-5)
        assert ca[k]["train"] == pytest.approx(cb[k]["train"], rel=1e-5)
        assert ca[k]["best_epoch"] == cb[k]["best_epoch"]
    torch.testing.assert_close(a.directions, b.directions, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in _state(lm).items())
    assert not any(steerdesk_hooks(blk) for blk in lm.blocks)


def test_prefix_cache_falls_back_to_hooks(tokenizer, plain_tokenizer, monkeypatch):
    """Where the direct path is unsupported (Gemma-2: a mask per attention type; no final norm found) or
    fails its self-check, the layer trains through the hook: exactly the vector of prefix_cache=False."""
    import steerdesk.core.optimize_cache as opt
    from steerdesk.core.prefix import Unsupported

    ds = synthetic(TOPICS[:6])
    s = OptimizeSettings(epochs=2, batch_size=3, seed=1)
    gemma = build_tiny("gemma2", tokenizer, plain_tokenizer)
    a = optimize_vectors(gemma, ds, [LAYER], settings=s)
    assert json.loads(a.metadata["optimize"])["curves"][str(LAYER)]["path"] == "hooks"
    assert torch.equal(a.directions, optimize_vectors(gemma, ds, [LAYER], settings=s, prefix_cache=False).directions)

    lm = build_tiny("llama", tokenizer, plain_tokenizer)
    plain = optimize_vectors(lm, ds, [LAYER], settings=s, prefix_cache=False).directions

    def no_tail(self, lm):
        raise Unsupported("no final norm found")

    with monkeypatch.context() as m:
        m.setattr(opt.DirectPath, "__init__", no_tail)
        b = optimize_vectors(lm, ds, [LAYER], settings=s)
    assert json.loads(b.metadata["optimize"])["curves"][str(LAYER)]["path"] == "hooks"
    assert torch.equal(b.directions, plain)

    real = opt.DirectPath.logits
    with monkeypatch.context() as m:  # a direct path whose logits are off fails the self-check
        m.setattr(opt.DirectPath, "logits", lambda self, *a: real(self, *a).roll(1, dims=-1))
        c = optimize_vectors(lm, ds, [LAYER], settings=s)
    assert json.loads(c.metadata["optimize"])["curves"][str(LAYER)]["path"] == "hooks"
    assert torch.equal(c.directions, plain)
    assert not any(steerdesk_hooks(blk) for blk in lm.blocks)


def test_prefix_cache_over_budget_records_each_layer_on_its_own(llama, monkeypatch):
    """Over the memory budget the reference forwards record nothing; each layer's block outputs are
    then recorded just before it trains (blocks 0..L only): the same vectors."""
    import steerdesk.core.optimize_steps as steps

    ds = synthetic(TOPICS[:6])
    s = OptimizeSettings(epochs=2, batch_size=3, seed=3)
    a = optimize_vectors(llama, ds, [1, 2], settings=s)
    recorded = []
    real = steps.StepScorer._record
    monkeypatch.setattr(steps, "CACHE_BUDGET_BYTES", 1)
    monkeypatch.setattr(steps.StepScorer, "_record", lambda self, layer: (recorded.append(layer), real(self, layer))[1])
    b = optimize_vectors(llama, ds, [1, 2], settings=s)
    assert recorded == [1, 2]
    assert [c["path"] for c in json.loads(b.metadata["optimize"])["curves"].values()] == ["prefix", "prefix"]
    torch.testing.assert_close(a.directions, b.directions, rtol=1e-5, atol=1e-6)


def test_cancel_with_prefix_cache_leaves_no_vector(llama):
    """A cancel during the cached training raises, returns nothing, leaves no hook and the weights intact."""
    ds = synthetic(TOPICS[:8])
    cancel = threading.Event()
    before = _state(llama)
    seen = []

    def progress(done, total):
        seen.append(done)
        if done == 3:
            cancel.set()

    out = []
    with pytest.raises(Cancelled):
        out.append(optimize_vectors(llama, ds, [LAYER], settings=OptimizeSettings(epochs=3, batch_size=2),
                                    progress=progress, cancel=cancel))
    assert out == [] and seen == [1, 2, 3]
    assert all(torch.equal(before[k], v) for k, v in _state(llama).items())
    assert not any(steerdesk_hooks(b) for b in llama.blocks)


def test_self_check_distribution_error_weighs_by_probability():
    """The neutral-text self-check compares distributions where their probability is: a large
    difference on an entry of negligible probability (bf16 rounding of a tail logit) is not a fault,
    the same difference on the likely entry is, and identical rows give 0."""
    from steerdesk.core.optimize_steps import distribution_error

    ref = torch.log_softmax(torch.tensor([[10.0, 0.0, -20.0, -20.0], [0.0, 8.0, -20.0, -20.0]]), -1)
    assert distribution_error(ref, ref) == 0.0
    tail = ref.clone()
    tail[:, 2:] += 0.5  # a 0.5-nat difference where the probability is ~1e-13
    assert tail.sub(ref).abs().max() == 0.5
    assert distribution_error(tail, ref) < 1e-9
    head = ref.clone()
    head[1, 1] -= 0.2  # a 0.2-nat difference on the token holding nearly all the probability
    assert distribution_error(head, ref) == pytest.approx(0.2, rel=1e-3)
    assert distribution_error(torch.empty(0, 4), torch.empty(0, 4)) == 0.0
