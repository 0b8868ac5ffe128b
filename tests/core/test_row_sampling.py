"""Per-row random streams under sampling (issue 10, item 2).

Every batch row draws from its own generator seeded from (seed, row identity = system + prompt),
so identity steering reproduces the unsteered row, and a row's tokens never depend on the rest of
the batch.
"""

from __future__ import annotations

import math

import pytest
import torch
from tinylm import PROMPT, strong_vectors

from steerdesk.core.errors import SteerdeskError
from steerdesk.core.generate import SamplingSettings, _RowSampler, compare, default_row_keys, generate, row_seeds
from steerdesk.core.steering import Steer, steers_for

HOT = SamplingSettings(max_new_tokens=12, temperature=1.0, seed=7)
OTHERS = ["Hi", "Tell me something about rivers and the sea.", "Why is the sky blue?",
          "Write one sentence about the sea."]


def _ids(lm, prompts, steering=None, sampling=HOT, **kw):
    return [r.token_ids for r in generate(lm, prompts, steering, sampling=sampling, **kw)]


def test_identity_steering_reproduces_unsteered_under_sampling(tiny):
    v = strong_vectors(tiny, factor=4.0)
    plain, steered = compare(tiny, PROMPT, steers_for(v, [1, 2], scale=0.0, mode="add"), sampling=HOT)
    assert len(plain.token_ids) > 0
    assert steered.token_ids == plain.token_ids
    assert steered.text == plain.text


def test_steered_row_alone_equals_steered_row_in_compare(tiny):
    steers = steers_for(strong_vectors(tiny, factor=4.0), [1])
    plain, steered = compare(tiny, PROMPT, steers, sampling=HOT)
    assert steered.token_ids != plain.token_ids  # the vector matters, or the check proves little
    assert _ids(tiny, [PROMPT], steers)[0] == steered.token_ids
    assert _ids(tiny, [PROMPT])[0] == plain.token_ids


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_row_is_the_same_in_batches_of_1_3_5(tiny):
    steers = steers_for(strong_vectors(tiny, factor=2.0), [2], positions="generated")
    alone = _ids(tiny, [PROMPT], steers)[0]
    assert len(alone) > 0
    three = _ids(tiny, [OTHERS[0], PROMPT, OTHERS[1]], steers)
    five = _ids(tiny, OTHERS[:2] + [PROMPT] + OTHERS[2:], steers)
    assert three[1] == alone
    assert five[2] == alone
    # The other prompts also keep their own streams.
    assert five[0] == three[0] == _ids(tiny, [OTHERS[0]], steers)[0]


@pytest.mark.parametrize("arch", ["llama"])
def test_grid_style_rows_per_row_steering(tiny):
    """Per-row steering (a generation grid): a cell is the same whatever its neighbours."""
    a = strong_vectors(tiny, factor=3.0, seed=1)
    rows = [[], [Steer(1, a[1], scale=1.0)], [Steer(1, a[1], scale=0.0)], [Steer(2, a[2], scale=-1.0)]]
    batched = _ids(tiny, [PROMPT] * 4, rows)
    for r, steers in enumerate(rows):
        assert batched[r] == _ids(tiny, [PROMPT], steers)[0], f"row {r}"
    assert batched[2] == batched[0]  # scale 0: the identity


@pytest.mark.parametrize("arch", ["llama"])
def test_different_seeds_differ_and_the_same_seed_repeats(tiny):
    runs = {seed: _ids(tiny, [PROMPT], sampling=SamplingSettings(max_new_tokens=12, temperature=1.0, seed=seed))[0]
            for seed in (1, 2, 3)}
    assert len({tuple(t) for t in runs.values()}) == 3
    again = _ids(tiny, [PROMPT], sampling=SamplingSettings(max_new_tokens=12, temperature=1.0, seed=2))[0]
    assert again == runs[2]


@pytest.mark.parametrize("arch", ["llama"])
def test_unseeded_sampling(tiny):
    s = SamplingSettings(max_new_tokens=12, temperature=1.0)
    a, b = _ids(tiny, [PROMPT], sampling=s)[0], _ids(tiny, [PROMPT], sampling=s)[0]
    assert len(a) > 0 and a != b  # a fresh stream per call
    torch.manual_seed(11)
    c = _ids(tiny, [PROMPT], sampling=s)[0]
    torch.manual_seed(11)
    assert _ids(tiny, [PROMPT], sampling=s)[0] == c  # torch.manual_seed still makes it repeatable
    # Rows of one call still share the prompt's stream: identity steering == unsteered.
    v = strong_vectors(tiny, factor=4.0)
    plain, steered = compare(tiny, PROMPT, steers_for(v, [1], scale=0.0), sampling=s)
    assert plain.token_ids == steered.token_ids


@pytest.mark.parametrize("arch", ["llama"])
def test_row_keys(tiny):
    two = _ids(tiny, [PROMPT, PROMPT], row_keys=["sample 1", "sample 2"])
    assert two[0] != two[1]  # distinct keys: independent samples of one prompt
    assert _ids(tiny, [PROMPT], row_keys=["sample 2"])[0] == two[1]
    # The default key is the prompt (+ system message): passing it explicitly changes nothing.
    assert _ids(tiny, [PROMPT], row_keys=default_row_keys([PROMPT]))[0] == _ids(tiny, [PROMPT])[0]
    with pytest.raises(SteerdeskError, match="row keys"):
        generate(tiny, [PROMPT], sampling=HOT, row_keys=["a", "b"])


@pytest.mark.parametrize("arch", ["llama"])
def test_system_message_is_part_of_the_row_identity(tiny):
    with_sys = _ids(tiny, [PROMPT], system="Be brief.")[0]
    assert with_sys == _ids(tiny, [PROMPT, "Hi"], system="Be brief.")[0]
    assert row_seeds(7, default_row_keys([PROMPT], "Be brief.")) != row_seeds(7, default_row_keys([PROMPT]))


def test_row_seeds_are_stable_and_distinct():
    a = row_seeds(7, ["x", "y", "x"])
    assert a[0] == a[2] and a[0] != a[1]
    assert row_seeds(8, ["x"])[0] != a[0]
    assert all(0 <= s < 2**63 for s in a)
    # Independent of the process: SHA-256 of the documented string, first 8 bytes little-endian.
    import hashlib

    want = int.from_bytes(hashlib.sha256(b"steerdesk-row/1|7|x").digest()[:8], "little") & (2**63 - 1)
    assert a[0] == want


# ----------------------------------------------------------------- the sampler's distribution

def _draw(scores: torch.Tensor, n: int, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Counts of the token drawn by ``n`` independent rows (one seed each) from ``scores``."""
    sampler = _RowSampler(temperature, top_p, row_seeds(0, [str(i) for i in range(n)]))
    out = sampler(torch.zeros((n, 1), dtype=torch.long), scores.expand(n, -1).clone())
    assert torch.isfinite(out).sum(dim=-1).eq(1).all()  # exactly one token left per row
    return torch.bincount(out.argmax(dim=-1), minlength=scores.shape[-1])


def test_sampler_matches_the_softmax_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    n = 20000
    for temperature in (1.0, 0.5):
        want = torch.softmax(logits.double() / temperature, dim=0)
        counts = _draw(logits, n, temperature).double()
        # Chi-square with 4 degrees of freedom; 18.5 is its 0.999 quantile.
        chi2 = float((((counts - n * want) ** 2) / (n * want)).sum())
        assert chi2 < 18.5, (temperature, counts.tolist(), (n * want).tolist())


def test_sampler_top_p_keeps_exactly_the_nucleus():
    logits = torch.tensor([3.0, 2.5, 0.0, -1.0, 1.0, -3.0])
    probs = torch.softmax(logits.double(), dim=0)
    order = probs.argsort(descending=True)
    # Nucleus by hand: the most likely tokens until their mass reaches top_p.
    top_p, mass, nucleus = 0.8, 0.0, []
    for i in order.tolist():
        nucleus.append(i)
        mass += float(probs[i])
        if mass >= top_p:
            break
    counts = _draw(logits, 6000, top_p=top_p)
    drawn = set(torch.nonzero(counts).reshape(-1).tolist())
    assert drawn == set(nucleus), (drawn, nucleus)
    kept = probs[nucleus] / probs[nucleus].sum()
    freq = counts[nucleus].double() / 6000
    assert torch.allclose(freq, kept, atol=4 * math.sqrt(0.25 / 6000))


# ----------------------------------------------------------------------------- SmolLM2

@pytest.mark.slow
def test_smol_identity_compare_and_batch_under_sampling(smol):
    v = torch.randn(smol.info.num_layers, smol.info.hidden_size, generator=torch.Generator().manual_seed(0))
    s = SamplingSettings(max_new_tokens=10, temperature=1.0, seed=7)
    prompt = "Write one sentence about the sea."
    plain, ident = compare(smol, prompt, steers_for(v, [14], scale=0.0), sampling=s)
    assert ident.token_ids == plain.token_ids
    steers = steers_for(v * 8.0, [14], scale=1.0)
    _, steered = compare(smol, prompt, steers, sampling=s)
    assert steered.token_ids != plain.token_ids
    batch = generate(smol, ["How do I boil an egg?", prompt, "Hi"], steers, sampling=s)
    assert batch[1].token_ids == steered.token_ids
