"""Steered generation: KV cache on == off, per-row steering == separate runs, streaming, stop."""

from __future__ import annotations

import threading

import pytest
import torch
from tinylm import PROMPT, strong_vectors

from steerdesk.core.errors import SteerdeskError
from steerdesk.core.generate import SamplingSettings, compare, encode_prompts, generate
from steerdesk.core.steering import Steer, Steering, steers_for

GREEDY = SamplingSettings(max_new_tokens=12)
LAYER = 1


def _ids(lm, prompt=PROMPT, steering=None, use_cache=True, **kw):
    return generate(lm, [prompt], steering, sampling=GREEDY, use_cache=use_cache, **kw)[0].token_ids


def test_unsteered_cache_on_equals_off(tiny):
    """Baseline: the model itself is cache-consistent, so differences below are steering's."""
    assert _ids(tiny, use_cache=True) == _ids(tiny, use_cache=False)


@pytest.mark.parametrize("mode,scale", [("add", 1.0), ("project", 1.0), ("clamp", 2.0)])
def test_steered_cache_on_equals_off(tiny, mode, scale):
    v = strong_vectors(tiny, factor=4.0)
    steers = steers_for(v, [LAYER], scale=scale, mode=mode)
    on = _ids(tiny, steering=steers, use_cache=True)
    off = _ids(tiny, steering=steers, use_cache=False)
    assert len(on) == GREEDY.max_new_tokens
    assert on == off
    # The vector is strong enough to matter, or the equality would prove little.
    assert on != _ids(tiny)


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_positions_cache_on_equals_off(tiny, positions):
    v = strong_vectors(tiny, factor=4.0)
    steers = steers_for(v, [LAYER, 2], mode="add", positions=positions)
    on = _ids(tiny, steering=steers, use_cache=True)
    off = _ids(tiny, steering=steers, use_cache=False)
    assert on == off
    plain = _ids(tiny)
    assert on != plain
    if positions == "generated":
        # The first new token comes from the last prompt position, which is not steered.
        assert on[0] == plain[0]


def test_positions_are_absolute(fresh_tiny):
    """'prompt' steers exactly the prompt tokens and 'generated' exactly the later ones."""
    lm = fresh_tiny("llama")
    v = strong_vectors(lm, factor=4.0)
    inputs = encode_prompts(lm, [PROMPT])
    width = inputs["input_ids"].shape[1]
    extra = torch.tensor([[42, 43, 44]])
    ids = torch.cat([inputs["input_ids"], extra], 1)
    seen = {}

    def observe(layer, h):
        seen[layer] = h.detach().clone()

    def run(positions):
        steers = steers_for(v, [LAYER], positions=positions)
        with torch.inference_mode(), Steering(lm, steers, prompt_length=width, observe=observe, watch=[LAYER]):
            lm.model(input_ids=ids)
        return seen[LAYER]

    plain = run("all") - v[LAYER]  # "all" adds v everywhere
    prompt_only = run("prompt") - plain
    gen_only = run("generated") - plain
    torch.testing.assert_close(prompt_only[0, :width], v[LAYER].expand(width, -1), atol=1e-5, rtol=0)
    assert prompt_only[0, width:].abs().max() < 1e-5
    torch.testing.assert_close(gen_only[0, width:], v[LAYER].expand(3, -1), atol=1e-5, rtol=0)
    assert gen_only[0, :width].abs().max() < 1e-5


# --------------------------------------------------------------------------- per row

def _row_steers(lm):
    a = strong_vectors(lm, factor=4.0, seed=1)
    b = strong_vectors(lm, factor=2.0, seed=2)
    return [[], [Steer(1, a[1])], [Steer(2, b[2], scale=-1.5)]]


def test_per_row_generation_equals_separate_runs(tiny):
    rows = _row_steers(tiny)
    batched = generate(tiny, [PROMPT] * 3, rows, sampling=GREEDY)
    for r, steers in enumerate(rows):
        alone = generate(tiny, [PROMPT], steers, sampling=GREEDY)[0]
        assert batched[r].token_ids == alone.token_ids, f"row {r}"
        assert batched[r].text == alone.text


def test_per_row_logits_equal_separate_runs(tiny):
    rows = _row_steers(tiny)
    ids = encode_prompts(tiny, [PROMPT] * 3)["input_ids"]
    with torch.inference_mode():
        with Steering(tiny, rows):
            batched = tiny.model(input_ids=ids).logits
        for r, steers in enumerate(rows):
            with Steering(tiny, steers):
                alone = tiny.model(input_ids=ids[r:r + 1]).logits
            torch.testing.assert_close(batched[r], alone[0], atol=1e-4, rtol=0)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


def test_per_row_mixed_modes_at_one_layer(tiny):
    """Rows with different modes, and two ops in one row, at the same layer."""
    v = strong_vectors(tiny, factor=3.0)
    w = strong_vectors(tiny, factor=2.0, seed=5)
    rows = [
        [Steer(1, v[1], mode="add")],
        [Steer(1, v[1], mode="project")],
        [Steer(1, w[1], mode="clamp", scale=0.5), Steer(1, v[1], mode="add", scale=-1.0)],
        [Steer(1, w[1], mode="add", normalize=True, scale=0.3)],
    ]
    ids = encode_prompts(tiny, [PROMPT] * len(rows))["input_ids"]
    with torch.inference_mode():
        with Steering(tiny, rows):
            batched = tiny.model(input_ids=ids).logits
        for r, steers in enumerate(rows):
            with Steering(tiny, steers):
                alone = tiny.model(input_ids=ids[r:r + 1]).logits
            torch.testing.assert_close(batched[r], alone[0], atol=1e-4, rtol=0)


def test_compare_rows(tiny):
    v = strong_vectors(tiny, factor=4.0)
    plain, steered = compare(tiny, PROMPT, steers_for(v, [LAYER]), sampling=GREEDY)
    assert plain.token_ids == _ids(tiny)
    assert steered.token_ids == _ids(tiny, steering=steers_for(v, [LAYER]))


def test_left_padded_batch_equals_single_prompts(tiny):
    prompts = [PROMPT, "Hi", "Tell me something about rivers and the sea."]
    v = strong_vectors(tiny, factor=4.0)
    steers = steers_for(v, [LAYER], positions="generated")
    batched = generate(tiny, prompts, steers, sampling=GREEDY)
    for p, res in zip(prompts, batched):
        assert res.token_ids == _ids(tiny, prompt=p, steering=steers)


# ------------------------------------------------------------------ streaming and stop

def test_streamed_text_equals_result(tiny):
    chunks: dict[int, list[str]] = {0: [], 1: []}
    v = strong_vectors(tiny, factor=4.0)
    results = generate(tiny, [PROMPT, "Hello"], [[], steers_for(v, [LAYER])], sampling=GREEDY,
                       on_text=lambda row, text: chunks[row].append(text))
    for r, res in enumerate(results):
        assert "".join(chunks[r]) == res.text
        assert res.finish_reason in ("length", "eos")


def test_stop_before_start_returns_nothing(tiny):
    stop = threading.Event()
    stop.set()
    res = generate(tiny, [PROMPT], sampling=GREEDY, stop=stop)[0]
    assert res.finish_reason == "stopped"
    assert res.token_ids == []


def test_stop_mid_generation(tiny):
    stop = threading.Event()
    steps = []

    def on_step(n, ids, mat):
        steps.append(ids)
        if len(steps) == 3:  # three tokens shown: stop
            stop.set()

    res = generate(tiny, [PROMPT], sampling=SamplingSettings(max_new_tokens=20), stop=stop, on_step=on_step)[0]
    assert res.finish_reason == "stopped"
    assert len(res.token_ids) == 3
    assert res.token_ids == _ids(tiny)[:3]


def test_watch_projections(tiny):
    v = strong_vectors(tiny, factor=4.0)
    res = generate(tiny, [PROMPT], steers_for(v, [LAYER]), sampling=GREEDY, watch=v)[0]
    assert len(res.projections) == len(res.token_ids)
    assert all(len(p) == tiny.info.num_layers for p in res.projections)


def test_sampling_with_seed_is_reproducible(tiny):
    s = SamplingSettings(max_new_tokens=8, temperature=0.9, top_p=0.95, seed=123)
    a = generate(tiny, [PROMPT], sampling=s)[0].token_ids
    b = generate(tiny, [PROMPT], sampling=s)[0].token_ids
    assert a == b


def test_generate_refuses_bad_requests(tiny):
    with pytest.raises(SteerdeskError, match="No prompt"):
        generate(tiny, [])
    with pytest.raises(SteerdeskError, match="empty"):
        generate(tiny, ["   "])
    with pytest.raises(SteerdeskError, match="steering rows"):
        generate(tiny, [PROMPT, PROMPT], [[], [], []])
    for bad in (SamplingSettings(max_new_tokens=0), SamplingSettings(temperature=-1),
                SamplingSettings(top_p=0), SamplingSettings(temperature=float("nan"))):
        with pytest.raises(SteerdeskError):
            generate(tiny, [PROMPT], sampling=bad)


def test_non_finite_output_is_reported(fresh_tiny):
    lm = fresh_tiny("llama")
    v = torch.full((lm.info.num_layers, lm.info.hidden_size), 3e38)
    with pytest.raises(SteerdeskError, match="NaN or infinite"):
        generate(lm, [PROMPT], steers_for(v, [0], scale=10.0), sampling=GREEDY)


# ------------------------------------------------------------------ incremental decoding

def _stream(tokenizer, rows_of_ids):
    """Feed token columns to a _RowStreamer the way model.generate does; return chunks per row."""
    from steerdesk.core.generate import _RowStreamer

    chunks: dict[int, list[str]] = {r: [] for r in range(len(rows_of_ids))}
    streamer = _RowStreamer(tokenizer, len(rows_of_ids), set(), lambda r, t: chunks[r].append(t), None, None)
    streamer.put(torch.zeros((len(rows_of_ids), 3), dtype=torch.long))  # the prompt call
    width = max(len(r) for r in rows_of_ids)
    for i in range(width):
        col = [r[i] if i < len(r) else tokenizer.pad_token_id for r in rows_of_ids]
        for r, row in enumerate(rows_of_ids):
            if i == len(row):
                streamer.done[r] = True
        streamer.put(torch.tensor(col))
    streamer.end()
    return chunks


TRICKY = ["Hello, world! It's a dragon's tale.", "Zürich → Kraków: naïve café ☕ 🐉🐉 日本語のテキスト",
          "  leading spaces\n\nand\ttabs ,, ... ' quotes ' \" ", "emoji family 👨‍👩‍👧‍👦 and flags 🇯🇵🇫🇷"]


@pytest.mark.parametrize("text", TRICKY)
def test_streamed_chunks_add_up_to_the_decoded_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = _stream(tokenizer, [ids])[0]
    assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all(c and "\ufffd" not in c for c in chunks)  # never half a character on screen


def test_streaming_decodes_a_short_window_per_token(tokenizer):
    """No re-decoding of the whole row per token (that is O(n^2) over a long reply)."""
    ids = tokenizer(" ".join(["The dragon flew over the mountains, and the villagers watched."] * 60),
                    add_special_tokens=False)["input_ids"]
    assert len(ids) > 600
    lengths: list[int] = []

    class Counting:
        def decode(self, seq, **kw):
            lengths.append(len(seq))
            return tokenizer.decode(seq, **kw)

    chunks = _stream(Counting(), [ids])[0]
    assert "".join(chunks) == tokenizer.decode(ids)
    per_token = [n for n in lengths[:-1]]  # the last call is end()'s one full decode
    assert max(per_token) <= 16, f"decoded up to {max(per_token)} tokens for one new token"


@pytest.mark.parametrize("seed", range(4))
def test_streaming_random_token_soup(tokenizer, seed):
    """Random ids (split multi-byte characters, odd merges): chunks still add up, row by row."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, tokenizer.vocab_size, (int(n),), generator=gen).tolist()
            for n in torch.randint(1, 80, (3,), generator=gen)]
    chunks = _stream(tokenizer, rows)
    for r, ids in enumerate(rows):
        assert "".join(chunks[r]) == tokenizer.decode(ids, skip_special_tokens=True), f"row {r}"


def test_streaming_goes_on_when_clean_up_rewrites_earlier_text():
    """A decode that rewrites text across chunks (" '" + "hi" -> "'hi") must not stall streaming."""
    pieces = [" a", " '", "hi", " b", " c"]

    class CleanUp:
        pad_token_id = 0

        def decode(self, ids, **kw):
            return "".join(pieces[i] for i in ids).replace(" '", "'")

    chunks = _stream(CleanUp(), [list(range(len(pieces)))])[0]
    assert len(chunks) >= 4, chunks  # one chunk per token, not one flush at the end
    assert "".join(chunks).endswith(" b c")
