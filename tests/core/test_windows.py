"""Token windows (issue 15 item 4): syntax, the boundary convention on per-token projections,
KV cache on == off, and left-padded batches == single prompts."""

from __future__ import annotations

import pytest
import torch
from tinylm import PROMPT, strong_vectors

from steerdesk.core.bake_plan import check_settings
from steerdesk.core.errors import SteerdeskError
from steerdesk.core.generate import SamplingSettings, encode_prompts, generate
from steerdesk.core.parsing import TokenWindow, parse_positions
from steerdesk.core.steering import Steer, Steering, steers_for

GREEDY = SamplingSettings(max_new_tokens=8)
LAYER = 1
WINDOWS = ["first:1", "first:3", "gen:2-4", "gen:3-", "prompt:1-3"]


# ------------------------------------------------------------------------------------ syntax

@pytest.mark.parametrize("text,window", [
    ("all", TokenWindow("all")), ("generated", TokenWindow("generated")), ("prompt", TokenWindow("prompt")),
    ("first:1", TokenWindow("gen", 0, 0)), ("first:4", TokenWindow("gen", 0, 3)),
    ("gen:0-3", TokenWindow("gen", 0, 3)), ("gen: 2 - 2", TokenWindow("gen", 2, 2)),
    ("gen:5-", TokenWindow("gen", 5, None)), ("prompt:2-5", TokenWindow("prompt_window", 2, 5)),
])
def test_parse_positions(text, window):
    assert parse_positions(text) == window


@pytest.mark.parametrize("text,match", [
    ("middle", "Unknown positions"), ("first:0", "N >= 1"), ("first:x", "Cannot read"),
    ("gen:4-2", "0 <= A <= B"), ("gen:-1-2", "Cannot read"), ("gen:3", "Cannot read"),
    ("prompt:2-", "Cannot read"), ("last:3", "Unknown positions"), ("gen:", "Unknown positions"),
])
def test_parse_positions_refuses(text, match):
    with pytest.raises(SteerdeskError, match=match):
        parse_positions(text)


def test_steer_check_and_bake_refuse_windows(tiny):
    v = strong_vectors(tiny)
    with pytest.raises(SteerdeskError, match="Cannot read positions 'gen:1'"):
        Steer(LAYER, v[LAYER], positions="gen:1").check(tiny.info.num_layers, tiny.info.hidden_size)
    Steer(LAYER, v[LAYER], positions="first:2").check(tiny.info.num_layers, tiny.info.hidden_size)
    with pytest.raises(SteerdeskError, match="cannot be baked"):
        check_settings("add", "first:2", LAYER)
    with pytest.raises(SteerdeskError, match="where each row's prompt starts"):
        Steering(tiny, [Steer(LAYER, v[LAYER], positions="prompt:0-1")], prompt_length=5)


# ------------------------------------------------------------------- boundary convention

def _teacher_forced_projection(lm, prompt, token_ids, unit):
    """Unsteered projections at block LAYER's output of the hidden states that produced each token."""
    ids = encode_prompts(lm, [prompt])["input_ids"]
    full = torch.cat([ids, torch.tensor([token_ids], device=ids.device)], 1)
    seen = {}
    with torch.inference_mode(), Steering(lm, [], observe=lambda layer, h: seen.update(h=h.clone()), watch=[LAYER]):
        lm.model(input_ids=full)
    width = ids.shape[1]
    h = seen["h"][0, width - 1: width - 1 + len(token_ids)].float()
    return (h @ unit).tolist()


@pytest.mark.parametrize("positions,steered", [
    ("first:1", {0}), ("first:4", {0, 1, 2, 3}), ("gen:2-4", {2, 3, 4}), ("gen:5-", {5, 6, 7}),
    ("generated", {1, 2, 3, 4, 5, 6, 7}), ("all", set(range(8))), ("prompt", {0}), ("prompt:0-2", set()),
])
@pytest.mark.parametrize("use_cache", [True, False])
def test_windows_steer_exactly_the_tokens_the_convention_says(tiny, positions, steered, use_cache):
    """Generated token k's projection (the hidden state that produced it, after steering) is shifted
    by exactly the scale when k is in the window, and not at all outside it (checked against an
    unsteered forward over the same tokens: block LAYER's output depends on nothing steered).
    "prompt" steers the last prompt token, whose hidden state produces token 0."""
    v = strong_vectors(tiny, factor=2.0)
    scale = 3.0
    steers = steers_for(v, [LAYER], scale=scale, normalize=True, positions=positions)
    res = generate(tiny, [PROMPT], steers, sampling=GREEDY, watch=v, use_cache=use_cache)[0]
    assert len(res.token_ids) == GREEDY.max_new_tokens, "the test needs every token"
    unit = (v[LAYER] / v[LAYER].norm()).float()
    plain = _teacher_forced_projection(tiny, PROMPT, res.token_ids, unit)
    shift = [res.projections[k][LAYER] - plain[k] for k in range(len(plain))]
    for k, d in enumerate(shift):
        assert d == pytest.approx(scale if k in steered else 0.0, abs=1e-3), (k, shift)


# ------------------------------------------------------------------- cache and batches

@pytest.mark.parametrize("positions", WINDOWS)
def test_windows_cache_on_equals_off(tiny, positions):
    v = strong_vectors(tiny, factor=4.0)
    steers = steers_for(v, [LAYER, 2], positions=positions)
    prompts = [PROMPT, "Hi", "Tell me something about rivers and the sea."]
    on = [r.token_ids for r in generate(tiny, prompts, steers, sampling=GREEDY, use_cache=True)]
    off = [r.token_ids for r in generate(tiny, prompts, steers, sampling=GREEDY, use_cache=False)]
    assert on == off
    plain = [r.token_ids for r in generate(tiny, prompts, sampling=GREEDY)]
    assert on != plain  # the window matters, or the equality would prove little


@pytest.mark.parametrize("positions", WINDOWS)
def test_left_padded_mixed_batch_equals_single_prompts(tiny, positions):
    """Rows of different lengths (different left padding), steered or not, windows counted per row."""
    prompts = [PROMPT, "Hi", "Tell me something about rivers and the sea.", "Hi"]
    v = strong_vectors(tiny, factor=4.0)
    steers = steers_for(v, [LAYER], positions=positions)
    rows = [steers, steers, steers, []]
    batched = generate(tiny, prompts, rows, sampling=GREEDY)
    for p, r, res in zip(prompts, rows, batched):
        assert res.token_ids == generate(tiny, [p], r, sampling=GREEDY)[0].token_ids


def test_prompt_window_counts_from_each_rows_first_token(tiny):
    """prompt:1-2 steers columns start+1, start+2 of every row (start = its left padding), nothing else."""
    v = strong_vectors(tiny, factor=2.0)
    inputs = encode_prompts(tiny, [PROMPT, "Hi"])
    starts = (inputs["attention_mask"] == 0).sum(1)
    assert int(starts[1]) > 0
    width = inputs["input_ids"].shape[1]
    seen = {}

    def run(steers):
        with torch.inference_mode(), Steering(tiny, steers, prompt_length=width, prompt_starts=starts,
                                               observe=lambda layer, h: seen.update(h=h.clone()), watch=[LAYER]):
            tiny.model(**inputs)
        return seen["h"]

    diff = run(steers_for(v, [LAYER], positions="prompt:1-2")) - run([])
    for r in range(2):
        for col in range(width):
            expected = v[LAYER] if col in (int(starts[r]) + 1, int(starts[r]) + 2) else torch.zeros_like(v[LAYER])
            assert torch.allclose(diff[r, col], expected, atol=1e-5), (r, col)
