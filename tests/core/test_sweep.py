"""Sweeps: equal to per-configuration evaluation, prefix reuse equal to full passes, scale 0, files."""

from __future__ import annotations

import json
import math
import struct
import threading
import zlib

import pytest
import torch
from tinylm import ARCHS, NUM_LAYERS, random_vectors

from steerdesk.core import heatmap as heatmap_mod
from steerdesk.core import prefix as prefix_mod
from steerdesk.core import sweep_engine as engine_mod
from steerdesk.core.datasets import Dataset, Example
from steerdesk.core.errors import Cancelled, SteerdeskError
from steerdesk.core.evaluate import NEUTRAL_TEXTS, evaluate
from steerdesk.core.steering import steers_for
from steerdesk.core.sweep import SweepResult, heatmap_png, pick_best, sweep

HELD = Dataset([
    Example("How do I boil an egg?", "Boil it for six minutes.", "Ugh. Six minutes. Obviously."),
    Example("What is the capital of France?", "Paris is the capital of France.", "Paris, duh. Look it up."),
    Example("Can you recommend a book?", "Try a classic novel such as Emma.", "Read anything. I don't care."),
], name="held")
LAYERS = [0, 2, 3]
SCALES = [0.0, 1.0, -2.0]
SETS = {"one+three": [1, 3]}
SMALL = dict(batch_size=2, max_rows=5)  # several batches, several forwards per layer


def _close(a, b, tol):
    return all((x is None and y is None) or abs(x - y) <= tol for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _vectors(lm):
    return random_vectors(lm, scale=0.5)


@pytest.mark.parametrize("arch,mode,positions", [("llama", "add", "all"), ("llama", "clamp", "generated"),
                                                ("gemma2", "project", "prompt"), ("gpt2", "add", "all")])
def test_sweep_equals_per_configuration_evaluation(tiny, arch, mode, positions):
    v = _vectors(tiny)
    kw = dict(mode=mode, positions=positions)
    res = sweep(tiny, v, HELD, layers=[0, 3], scales=SCALES, sets=SETS, neutral=NEUTRAL_TEXTS[:2], **kw, **SMALL)
    assert res.path == "prefix"
    # Packed layouts (pairs sharing prompt tokens) wherever exact: not past Gemma2's tiny sliding window.
    assert res.packed == (arch != "gemma2")
    for r in range(res.n_rows):
        for c, scale in enumerate(SCALES):
            if scale == 0 and mode != "clamp":
                continue  # identity: covered by test_scale_zero_column_is_zero
            ev = evaluate(tiny, HELD, steers_for(v, res.row_layers(r), scale=scale, **kw),
                          neutral=NEUTRAL_TEXTS[:2])
            m, f = res.cell(r, c)
            kl = res.kl[r][c] if r < len(res.layers) else res.sets[r - len(res.layers)].kl[c]
            assert m == pytest.approx(ev.margin_delta, abs=1e-4), (r, c)
            assert f == pytest.approx(ev.fluency_delta, abs=1e-4), (r, c)
            assert kl == pytest.approx(ev.kl, abs=1e-4), (r, c)
    assert res.baseline["margin"] == pytest.approx(ev.unsteered.margin, abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_reuse_equals_full_forward_passes(tiny):
    v = _vectors(tiny)
    kw = dict(layers=LAYERS, scales=SCALES, sets=SETS, neutral=NEUTRAL_TEXTS[:1], **SMALL)
    fast = sweep(tiny, v, HELD, prefix_reuse=True, **kw)
    full = sweep(tiny, v, HELD, prefix_reuse=False, **kw)
    assert fast.path == "prefix" and full.path == "full"
    assert _close(fast.margin_delta, full.margin_delta, 1e-4)
    assert _close(fast.fluency_delta, full.fluency_delta, 1e-4)
    assert _close(fast.kl, full.kl, 1e-4)
    assert _close([fast.sets[0].margin_delta], [full.sets[0].margin_delta], 1e-4)
    # The steering is strong enough for the comparison to mean something.
    assert max(abs(x) for row in fast.fluency_delta for x in row) > 1e-3


@pytest.mark.parametrize("arch", ["llama"])
@pytest.mark.parametrize("pack", [False, True])
def test_prefix_reuse_skips_the_blocks_below_the_steered_layer(tiny, pack):
    from steerdesk.core.evaluate import make_packed_layouts, prepare_texts

    calls = {0: 0, 2: 0, NUM_LAYERS - 1: 0}
    tokens = {0: 0, 2: 0, NUM_LAYERS - 1: 0}

    def counter(layer):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            calls[layer] += h.shape[0]
            tokens[layer] += h.shape[0] * h.shape[1]
        return hook

    handles = [tiny.blocks[k].register_forward_pre_hook(counter(k), with_kwargs=True) for k in calls]
    try:
        res = sweep(tiny, _vectors(tiny), HELD, layers=[2, 3], scales=[0.5, 1.0], batch_size=8, max_rows=64,
                    pack=pack)
    finally:
        for h in handles:
            h.remove()
    texts = 2 * len(HELD)
    assert res.path == "prefix" and res.packed == pack
    if not pack:
        # Block 0 ran once per text (the unsteered pass) and never for a configuration; block 2 neither:
        # steering adds to its output, which the unsteered pass recorded.
        assert calls[0] == texts and calls[2] == texts
        # The last block ran for the unsteered pass, the self-check (2 texts x 2, from block 2's output)
        # and the 2 configurations steered at layer 2; those steered at layer 3 (the last) run no block.
        assert calls[NUM_LAYERS - 1] == texts + 4 + 2 * texts
        return
    # Packed: the three pairs (and their shared system prompt) fit one row.
    (lay,) = make_packed_layouts(tiny, prepare_texts(tiny, HELD), max_rows=8)
    assert lay.rows == 1 and lay.n_segments == texts
    # Block 0: the model's own unpacked pass (the reference) and the packed unsteered pass, nothing else.
    assert calls[0] == texts + 1 and calls[2] == texts + 1
    # The last block: both unsteered passes, the self-check (1 row x 2) and the 2 configurations of one
    # row steered at layer 2 ...
    assert calls[NUM_LAYERS - 1] == texts + 1 + 2 + 2
    # ... each configuration on fewer tokens than the six texts unpacked (shared prompt tokens).
    unpacked_tokens = tokens[0] - lay.width  # block 0 saw the unpacked batch once, and the packed row
    assert lay.width < unpacked_tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["add", "project"])
def test_scale_zero_column_is_zero(tiny, mode):
    res = sweep(tiny, _vectors(tiny), HELD, layers=LAYERS, scales=[0.0, 1.0], mode=mode, neutral=NEUTRAL_TEXTS[:1])
    for r in range(len(LAYERS)):
        assert abs(res.margin_delta[r][0]) <= 1e-5 and abs(res.fluency_delta[r][0]) <= 1e-5
        assert abs(res.kl[r][0]) <= 1e-5


@pytest.mark.parametrize("arch", ["llama"])
def test_fallback_to_full_passes_when_the_tail_is_unknown(tiny, monkeypatch):
    v = _vectors(tiny)
    want = sweep(tiny, v, HELD, layers=[1, 3], scales=[1.0], prefix_reuse=False)
    monkeypatch.setattr(prefix_mod, "FINAL_NORMS", ("no_such_norm",))
    got = sweep(tiny, v, HELD, layers=[1, 3], scales=[1.0])
    assert got.path == "full"
    assert _close(got.margin_delta, want.margin_delta, 1e-5)


@pytest.mark.parametrize("arch", ["llama"])
def test_self_check_catches_a_wrong_direct_path(tiny, monkeypatch):
    v = _vectors(tiny)
    want = sweep(tiny, v, HELD, layers=[1, 3], scales=[1.0], prefix_reuse=False)
    real = prefix_mod.Tail.logits
    monkeypatch.setattr(prefix_mod.Tail, "logits", lambda self, h: real(self, h) * 1.1)
    got = sweep(tiny, v, HELD, layers=[1, 3], scales=[1.0])
    assert got.path == "full"
    assert _close(got.margin_delta, want.margin_delta, 1e-5)


@pytest.mark.parametrize("arch", ["llama"])
def test_small_cache_budget_gives_the_same_result(tiny):
    v = _vectors(tiny)
    kw = dict(layers=LAYERS, scales=SCALES, batch_size=2)
    a = sweep(tiny, v, HELD, **kw)
    b = sweep(tiny, v, HELD, cache_budget=1, **kw)  # one batch per chunk
    assert _close(a.margin_delta, b.margin_delta, 1e-6) and _close(a.fluency_delta, b.fluency_delta, 1e-6)


@pytest.mark.parametrize("arch", ["llama"])
def test_on_cell_progress_and_result_fields(tiny, tmp_path):
    cells, ticks = [], []
    res = sweep(tiny, _vectors(tiny), HELD, layers=LAYERS, scales=SCALES, sets=SETS, fluency_budget=0.25,
                on_cell=lambda *a: cells.append(a), progress=lambda d, t: ticks.append((d, t)), **SMALL)
    n_rows = len(LAYERS) + len(SETS)
    assert sorted((r, c) for r, c, _, _ in cells) == [(r, c) for r in range(n_rows) for c in range(len(SCALES))]
    for r, c, m, f in cells:
        assert (m, f) == res.cell(r, c)
    assert ticks[-1][0] == ticks[-1][1] and all(t == ticks[0][1] for _, t in ticks)
    # best: the largest margin delta among the cells within the fluency budget
    within = [(res.cell(r, c)[0], r, c) for r in range(n_rows) for c in range(len(SCALES)) if res.within_budget(r, c)]
    _, r, c = max(within)
    assert (res.best["row"], res.best["col"]) == (r, c)
    assert res.best["scale"] == SCALES[c] and res.best["layers"] == res.row_layers(r)
    obj = res.to_dict()
    for key in ("layers", "scales", "margin_delta", "fluency_delta", "best", "model", "vector", "dataset",
                "settings", "baseline", "fluency_budget"):
        assert key in obj
    assert len(obj["margin_delta"]) == len(LAYERS) and len(obj["margin_delta"][0]) == len(SCALES)
    assert obj["model"]["name"] == "tiny-llama" and obj["model"]["chat_template_sha256"]
    assert obj["dataset"]["sha256"] == HELD.sha256() and obj["dataset"]["n_pairs"] == 3
    assert len(obj["vector"]["directions_sha256"]) == 64
    path = tmp_path / "sweep.json"
    res.save(path)
    back = SweepResult.load(path)
    assert back.to_dict() == json.loads(path.read_text())
    assert back.margin_delta == res.margin_delta and back.best == res.best


@pytest.mark.parametrize("arch", ["llama"])
def test_cancel(tiny):
    stop = threading.Event()
    seen = []

    def on_cell(*a):
        seen.append(a)
        stop.set()

    with pytest.raises(Cancelled):
        sweep(tiny, _vectors(tiny), HELD, layers=LAYERS, scales=[1.0, 2.0], on_cell=on_cell, cancel=stop)
    # Both scales of layer 0 share a forward pass; nothing runs after the Event is set.
    assert [(r, c) for r, c, _, _ in seen] == [(0, 0), (0, 1)]


@pytest.mark.parametrize("arch", ["llama"])
def test_sweep_errors(tiny):
    v = _vectors(tiny)
    with pytest.raises(SteerdeskError, match="out of range"):
        sweep(tiny, v, HELD, layers=[NUM_LAYERS])
    with pytest.raises(SteerdeskError, match="mode"):
        sweep(tiny, v, HELD, layers=[1], mode="shout")
    with pytest.raises(SteerdeskError, match="hidden size"):
        sweep(tiny, torch.zeros(NUM_LAYERS, 3), HELD, layers=[1])
    with pytest.raises(SteerdeskError, match="budget"):
        sweep(tiny, v, HELD, layers=[1], fluency_budget=-1)
    with pytest.raises(SteerdeskError, match="No scales"):
        sweep(tiny, v, HELD, layers=[1], scales=[])
    with pytest.raises(SteerdeskError, match="absurd"):
        sweep(tiny, v, HELD, layers=[1], scales=[1e9])


def test_pick_best_respects_the_budget():
    margin = [[0.0, 0.5, 2.0], [0.0, 0.8, None]]
    fluency = [[0.0, -0.1, -0.9], [0.0, -0.4, -0.1]]
    assert pick_best(margin, fluency, 0.5) == (1, 1)
    assert pick_best(margin, fluency, 1.0) == (0, 2)
    assert pick_best([[math.nan]], [[0.0]], 0.5) is None


def _read_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    raw = zlib.decompress(chunks[b"IDAT"])
    assert (depth, color) == (8, 2) and len(raw) == h * (1 + 3 * w)
    return w, h


@pytest.mark.parametrize("arch", ["llama"])
def test_heatmap_png(tiny, tmp_path):
    res = sweep(tiny, _vectors(tiny), HELD, layers=LAYERS, scales=SCALES, sets=SETS, fluency_budget=0.01)
    path = tmp_path / "heat.png"
    heatmap_png(res, path)
    w, h = _read_png(path)
    assert w > 3 * heatmap_mod.CELL_W and h >= heatmap_mod.TOP + 4 * heatmap_mod.CELL_H
    px = _pixels(path)
    ink = [(x, y) for y in range(heatmap_mod.TOP - 2) for x in range(w) if px[y][x] == (30, 30, 30)]
    assert ink and all(y < heatmap_mod.TOP for _, y in ink)  # the titles and scale values sit above the cells
    assert heatmap_mod.diverging_rgb(0.0) == (242, 242, 242)
    assert heatmap_mod.diverging_rgb(1.0)[0] > heatmap_mod.diverging_rgb(1.0)[2]  # positive = warm


@pytest.mark.slow
def test_smol_rude_sweep_has_a_positive_cell_within_budget(smol):
    """SmolLM2 + the bundled rude set: steering at a middle layer raises the rude margin cheaply."""
    from steerdesk.core.datasets import load_bundled
    from steerdesk.core.extract import compute_vectors

    train, held = load_bundled("neutral_rude").split(0.25)
    vs = compute_vectors(smol, train, batch_size=16)
    res = sweep(smol, vs, held, layers=[10, 14, 18], scales=[0.0, 0.5, 1.0], max_pairs=8)
    assert res.path == "prefix"
    assert [row[0] for row in res.margin_delta] == [0.0, 0.0, 0.0]
    good = [(r, c) for r in range(3) for c in range(3)
            if res.margin_delta[r][c] > 0.05 and res.within_budget(r, c)]
    assert good, res.margin_delta
    assert res.best is not None and res.best["margin_delta"] > 0.05 and res.best["fluency_delta"] >= -0.5


# ------------------------------------------------------------------ rows without a direction (issue 10)

def _pixels(path):
    """``[h][w]`` RGB tuples of a PNG written by ``heatmap_png`` (filter type 0 rows)."""
    w, h = _read_png(path)
    data = path.read_bytes()
    pos, idat = 8, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        if data[pos + 4:pos + 8] == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = zlib.decompress(idat)
    rows = []
    for y in range(h):
        line = raw[y * (1 + 3 * w):(y + 1) * (1 + 3 * w)]
        assert line[0] == 0
        rows.append([tuple(line[1 + 3 * x:4 + 3 * x]) for x in range(w)])
    return rows


@pytest.mark.parametrize("arch", ["llama"])
def test_gguf_vector_marks_layer_0_no_vector_and_equals_the_safetensors_sweep_elsewhere(tiny, tmp_path):
    """A GGUF control vector has no block 0: that row is null + "no vector", never 0, never best, not run."""
    from tinylm import rude4

    from steerdesk.core.extract import compute_vectors
    from steerdesk.core.sweep import NO_VECTOR_BG, NO_VECTOR_HATCH, format_table
    from steerdesk.core.vectors import export_gguf, import_gguf, load_vectors, save_vectors

    vs = compute_vectors(tiny, rude4())
    save_vectors(vs, tmp_path / "v.safetensors")
    export_gguf(vs, tmp_path / "v.gguf")
    st = load_vectors(tmp_path / "v.safetensors")
    gg = import_gguf(tmp_path / "v.gguf", tiny.info.num_layers)
    sets = {"zero+two": [0, 2], "two+three": [2, 3]}
    kw = dict(layers=[0, 1, 3], scales=[0.0, 2.0, -4.0], sets=sets, neutral=NEUTRAL_TEXTS[:1], fluency_budget=50.0,
              **SMALL)
    a = sweep(tiny, st, HELD, **kw)
    ticks = []
    b = sweep(tiny, gg, HELD, progress=lambda d, t: ticks.append((d, t)), **kw)
    assert a.no_vector == [False, False, False] and not any(s.no_vector for s in a.sets)
    assert b.no_vector == [True, False, False]
    assert [s.no_vector for s in b.sets] == [True, False]
    # Null, not zero -- also the scale-0 column, which would otherwise read as a measured 0.
    assert b.margin_delta[0] == [None] * 3 and b.fluency_delta[0] == [None] * 3 and b.kl[0] == [None] * 3
    assert b.sets[0].margin_delta == [None] * 3 and b.sets[0].fluency_delta == [None] * 3
    # Every other row equals the safetensors sweep (the GGUF keeps layers >= 1 exactly).
    assert _close(b.margin_delta[1:], a.margin_delta[1:], 1e-6)
    assert _close(b.fluency_delta[1:], a.fluency_delta[1:], 1e-6)
    assert _close([b.sets[1].margin_delta], [a.sets[1].margin_delta], 1e-6)
    # Best: the best of the rows that have a vector, computed here from a's numbers.
    ok_rows = [1, 2, 4]  # layers 1 and 3, set two+three
    margins = [[a.cell(r, c)[0] for c in range(3)] for r in ok_rows]
    fl = [[a.cell(r, c)[1] for c in range(3)] for r in ok_rows]
    r_ok, c_ok = pick_best(margins, fl, 50.0)
    assert (b.best["row"], b.best["col"]) == (ok_rows[r_ok], c_ok)
    # Not evaluated: as many forward passes as the same sweep without the no-vector rows.
    ticks_without = []
    sweep(tiny, gg, HELD, **{**kw, "layers": [1, 3], "sets": {"two+three": [2, 3]}},
          progress=lambda d, t: ticks_without.append((d, t)))
    assert ticks[-1] == ticks_without[-1]
    # JSON: null cells and an explicit per-row marker; a round trip keeps it.
    d = json.loads(json.dumps(b.to_dict(), allow_nan=False))
    assert d["no_vector"] == [True, False, False] and d["margin_delta"][0] == [None, None, None]
    assert [s["no_vector"] for s in d["sets"]] == [True, False]
    again = SweepResult.from_dict(d)
    assert again.no_vector == b.no_vector and not again.row_has_vector(0) and not again.row_has_vector(3)
    # Text table: "no vector", not a number.
    table = format_table(b).splitlines()
    row0 = table[2]  # after the legend and the scales
    assert row0.split()[0] == "0"
    assert "no vector" in row0 and "+0.000" not in row0 and "nan" not in row0
    assert "no vector (not evaluated): layer 0, zero+two" in table[-1]
    # PNG: the no-vector row is the beige band with dark hatching; no other row has that colour.
    path = tmp_path / "heat.png"
    heatmap_png(b, path)
    px = _pixels(path)
    top, cell_h, cell_w, label_w = heatmap_mod.TOP, heatmap_mod.CELL_H, heatmap_mod.CELL_W, heatmap_mod.LABEL_W
    band0 = [p for y in range(top, top + cell_h - 1) for p in px[y][label_w:label_w + 3 * cell_w - 1]]
    assert band0.count(NO_VECTOR_BG) > len(band0) // 3 and band0.count(NO_VECTOR_HATCH) > len(band0) // 20
    assert (30, 30, 30) in band0  # the words
    band1 = [p for y in range(top + cell_h, top + 2 * cell_h - 1) for p in px[y][label_w:label_w + 3 * cell_w - 1]]
    assert NO_VECTOR_BG not in band1


@pytest.mark.parametrize("arch", ["llama"])
def test_raw_tensor_zero_rows_are_no_vector_and_all_missing_is_refused(tiny):
    v = _vectors(tiny).clone()
    v[2] = 0
    res = sweep(tiny, v, HELD, layers=[1, 2], scales=[0.0, 1.0])
    assert res.no_vector == [False, True] and res.margin_delta[1] == [None, None]
    assert res.margin_delta[0][1] is not None and res.best["row"] == 0
    with pytest.raises(SteerdeskError, match="no direction for layer 2"):
        sweep(tiny, v, HELD, layers=[2], scales=[0.0, 1.0])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forwards_cut_to_a_token_budget_give_the_same_cells(tiny, monkeypatch):
    """With oneDNN linear layers a steered forward is cut to CPU_FORWARD_TOKENS (one oneDNN block); the cells
    do not change."""
    v = _vectors(tiny)
    kw = dict(layers=LAYERS, scales=SCALES, sets=SETS, neutral=NEUTRAL_TEXTS[:1], batch_size=8, max_rows=64)
    whole = sweep(tiny, v, HELD, **kw)
    calls = []
    handle = tiny.blocks[NUM_LAYERS - 1].register_forward_pre_hook(
        lambda m, a, k: calls.append((a[0] if a else k["hidden_states"]).shape[0]), with_kwargs=True)
    monkeypatch.setattr(engine_mod, "forward_token_cap", lambda lm: 1)  # one row (of one configuration) per forward
    try:
        cut = sweep(tiny, v, HELD, **kw)
    finally:
        handle.remove()
    assert cut.packed == whole.packed and cut.path == "prefix"
    assert max(calls[-5:]) == 1  # the last forwards (steered cells) ran one row at a time
    assert _close(cut.margin_delta, whole.margin_delta, 1e-6) and _close(cut.fluency_delta, whole.fluency_delta, 1e-6)
    assert _close(cut.kl, whole.kl, 1e-6)
    assert _close([cut.sets[0].margin_delta], [whole.sets[0].margin_delta], 1e-6)


def test_the_token_cap_follows_the_linear_kernel(fresh_tiny):
    """The 1024-token cap is for oneDNN's blocked products; aten's take any row count in one call."""
    from steerdesk.core.kernels import use_cpu_linear

    lm = fresh_tiny("llama")
    use_cpu_linear(lm.model, "aten")
    assert engine_mod.forward_token_cap(lm) is None
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    use_cpu_linear(lm.model, "onednn")
    assert engine_mod.forward_token_cap(lm) == engine_mod.CPU_FORWARD_TOKENS
