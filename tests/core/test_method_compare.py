"""Method comparison (issue 17 item 3): checked against a naive per-configuration computation."""

from __future__ import annotations

import pytest
import torch
from tinylm import build_tiny

from steerdesk.core.datasets import Dataset, Example
from steerdesk.core.errors import Cancelled, SteerdeskError
from steerdesk.core.evaluate import evaluate
from steerdesk.core.extract import compute_vectors, encode
from steerdesk.core.method_compare import compare_methods, prompt_baseline
from steerdesk.core.optimize import OptimizeSettings, optimize_vectors
from steerdesk.core.steering import Steer

TOPICS = ["rivers", "bread", "chess", "trains", "clouds", "tigers", "copper", "violins", "tulips", "comets",
          "glaciers", "owls"]
LAYERS = [1, 2]
SCALES = [0.5, 1.0, 2.0, 4.0]
INSTRUCTION = "Reply in a bored tone."


def synthetic(topics: list[str], name: str) -> Dataset:
    return Dataset([Example(f"Tell me about {t}.", f"{t.capitalize()} are a fine subject to study.",
                            f"Meh. {t.capitalize()} bore me, honestly, whatever.") for t in topics], name=name)


@pytest.fixture(scope="module")
def llama(tokenizer, plain_tokenizer):
    return build_tiny("llama", tokenizer, plain_tokenizer)


def _mean_logprob(lm, prompt: str, reply: str, system: str | None) -> float:
    """Per-token mean log-prob of ``reply`` given ``prompt``: one unbatched forward of the model."""
    (enc,) = encode(lm, [(prompt, reply)], system)
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        logp = lm.model(input_ids=ids).logits[0].float().log_softmax(-1)
    toks = ids[0, enc.reply_start:]
    return float(logp[enc.reply_start - 1:-1].gather(-1, toks[:, None]).mean())


def _naive_scores(lm, ds: Dataset, system: str | None) -> tuple[float, float]:
    """(margin, fluency) from per-text forwards: mean over pairs of target - base, mean over all replies."""
    base = [_mean_logprob(lm, e.prompt, e.base, system) for e in ds.examples]
    target = [_mean_logprob(lm, e.prompt, e.target, system) for e in ds.examples]
    margin = sum(t - b for t, b in zip(target, base)) / len(base)
    return margin, (sum(base) + sum(target)) / (2 * len(base))


def _naive_best(lm, vs, held: Dataset, budget: float) -> tuple[float | None, tuple[int, float] | None]:
    """Each (layer, scale) evaluated on its own (core.evaluate), the best margin within the budget."""
    best: tuple[float | None, tuple[int, float] | None] = (None, None)
    for layer in LAYERS:
        for scale in SCALES:
            ev = evaluate(lm, held, [Steer(layer, vs.directions[layer], scale=scale)])
            if -ev.fluency_delta <= budget and (best[0] is None or ev.margin_delta > best[0]):
                best = (ev.margin_delta, (layer, scale))
    return best


def test_compare_matches_naive_per_configuration(llama):
    """Each method's best held-out margin within the budget, its cell, and the prompt baseline equal an
    independent computation: vectors computed on their own, every cell evaluated alone, the prompt
    baseline from unbatched forwards of the model with and without the instruction."""
    train, held = synthetic(TOPICS[:9], "train"), synthetic(TOPICS[9:], "held")
    settings = OptimizeSettings(epochs=2, batch_size=4, lr=0.1)
    vectors = {"mean-diff": compute_vectors(llama, train), "pca": compute_vectors(llama, train, method="pca"),
               "optimized": optimize_vectors(llama, train, LAYERS, settings=settings)}
    # A budget that some cells of the mean difference exceed, so the budget decides.
    fl = sorted(-evaluate(llama, held, [Steer(x, vectors["mean-diff"].directions[x], scale=s)]).fluency_delta
                for x in LAYERS for s in SCALES)
    budget = fl[len(fl) // 2]
    reports = []
    cmp = compare_methods(llama, train, held, layers=LAYERS, scales=SCALES, budget=budget,
                          instruction=INSTRUCTION, optimize=settings, on_epoch=reports.append)
    assert [m.method for m in cmp.methods] == ["mean-diff", "pca", "optimized"]
    assert len(reports) == len(LAYERS) * 3  # epochs 0..2 per layer
    for name, vs in vectors.items():
        want, cell = _naive_best(llama, vs, held, budget)
        row = cmp.result(name)
        if want is None:
            assert row.best_margin is None
        else:
            assert row.best_margin == pytest.approx(want, abs=1e-4)
            assert (row.best_layer, row.best_scale) == cell
    margin0, fluency0 = _naive_scores(llama, held, None)
    margin1, fluency1 = _naive_scores(llama, held, INSTRUCTION)
    assert cmp.prompt is not None
    assert cmp.prompt.margin_delta == pytest.approx(margin1 - margin0, abs=1e-4)
    assert cmp.prompt.fluency_delta == pytest.approx(fluency1 - fluency0, abs=1e-4)
    assert cmp.prompt.within_budget == (-(fluency1 - fluency0) <= budget)
    md = cmp.result("mean-diff").best_margin
    if md is not None and md > 0:
        assert cmp.ratio("optimized") == pytest.approx(cmp.result("optimized").best_margin / md)
    data = cmp.to_dict()
    assert data["winner"] == cmp.winner() and len(data["methods"]) == 3
    table = cmp.format_table()
    assert "optimized" in table and "prompt" in table


def test_extra_rows_and_winner(llama):
    """A given vector set is swept as its own row; the winner is the largest margin within the budget."""
    train, held = synthetic(TOPICS[:9], "train"), synthetic(TOPICS[9:], "held")
    md = compute_vectors(llama, train)
    cmp = compare_methods(llama, train, held, layers=[1], scales=[1.0], budget=100.0, methods=["mean-diff"],
                          extra={"file": md})
    a, b = cmp.result("mean-diff"), cmp.result("file")
    assert a.best_margin == pytest.approx(b.best_margin, abs=1e-6)
    assert cmp.winner() in ("mean-diff", "file")


def test_refusals_and_cancel(llama):
    train, held = synthetic(TOPICS[:9], "train"), synthetic(TOPICS[9:], "held")
    with pytest.raises(SteerdeskError, match="Unknown method"):
        compare_methods(llama, train, held, layers=[1], scales=[1.0], methods=["lora"])
    with pytest.raises(SteerdeskError, match="layers and scales"):
        compare_methods(llama, train, held, layers=[], scales=[1.0])
    with pytest.raises(SteerdeskError, match="budget"):
        compare_methods(llama, train, held, layers=[1], scales=[1.0], budget=-1.0)
    with pytest.raises(SteerdeskError, match="instruction"):
        prompt_baseline(llama, held, "  ", 0.5)
    with pytest.raises(SteerdeskError, match="at least 3 pairs"):
        compare_methods(llama, synthetic(TOPICS[:2], "two"), held, layers=[1], scales=[1.0], methods=["optimized"])
    import threading

    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        compare_methods(llama, train, held, layers=[1], scales=[1.0], cancel=stop)


def test_compare_job_writes_a_record_that_reruns(llama, tmp_path):
    """The compare job records its run like the other jobs (kind "compare": dataset embedded, split,
    layers x scales, methods, the optimized method's effective settings, the extra rows' vectors
    embedded, the comparison as outputs); ``steerdesk run`` re-runs it to the same numbers, and a
    recorded number that differs is reported."""
    from steerdesk import jobs
    from steerdesk.core.records import RunRecord
    from steerdesk.jobs.rerun import compare, rerun

    ds = synthetic(TOPICS, "bored")
    extra = compute_vectors(llama, ds.split(0.25, 0)[0], method="pca")
    spec = jobs.CompareSpec(dataset=ds, layers=(1, 2), scales=(0.5, 2.0), heldout=0.25, budget=0.5,
                            instruction=INSTRUCTION, optimize=OptimizeSettings(epochs=1, batch_size=4),
                            extra=(("file.safetensors", extra),))
    result = jobs.run(llama, spec)
    record = jobs.record(llama, spec, result, seconds=2.5)
    assert record.kind == "compare" and record.seconds == 2.5
    assert record.outputs["comparison"] == result.to_dict()
    assert record.settings["optimize"]["epochs"] == 1 and record.settings["methods"] == list(spec.methods)
    assert record.dataset["examples"] and record.dataset["heldout"] == 0.25
    assert record.title.startswith("compare · mean-diff, pca, optimized · L1,2")
    path = tmp_path / "compare.json"
    record.save(path)
    recipe = RunRecord.load(path)
    again = rerun(recipe, lm=llama)
    assert again.reproduced, again.differences
    assert isinstance(again.spec, jobs.CompareSpec) and again.spec.optimize == spec.optimize
    assert [m.method for m in again.result.methods] == ["mean-diff", "pca", "optimized", "file.safetensors"]
    assert again.result.result("file.safetensors").best_margin == pytest.approx(
        result.result("file.safetensors").best_margin, abs=1e-6)
    changed = RunRecord.load(path)
    changed.outputs["comparison"]["methods"][2]["margin_delta"][0][0] += 0.01
    changed.outputs["comparison"]["prompt"]["margin_delta"] += 0.01
    assert compare(changed, again.record) == ["optimized: scores differ from the record by more than 1e-4",
                                              "the prompt baseline differs from the record by more than 1e-4"]


def test_compare_record_with_no_methods_reruns_only_the_extra_rows(llama, tmp_path):
    """``inspect --compare --methods ""`` compares only the given vector file; its record says
    ``methods: []`` and the re-run must compare the same (not fall back to all three methods)."""
    from steerdesk import jobs
    from steerdesk.core.records import RunRecord
    from steerdesk.jobs.rerun import rerun

    ds = synthetic(TOPICS, "bored")
    extra = compute_vectors(llama, ds.split(0.25, 0)[0])
    spec = jobs.CompareSpec(dataset=ds, layers=(1,), scales=(1.0,), heldout=0.25, budget=0.5, methods=(),
                            extra=(("file.safetensors", extra),))
    result = jobs.run(llama, spec)
    record = jobs.record(llama, spec, result, seconds=1.0)
    assert record.settings["methods"] == []
    path = tmp_path / "only-file.json"
    record.save(path)
    again = rerun(RunRecord.load(path), lm=llama)
    assert again.reproduced, again.differences
    assert [m.method for m in again.result.methods] == ["file.safetensors"]
