"""The real embedded SmolLM2-135M-Instruct: conventions, and that steering steers (slow)."""

from __future__ import annotations

import pytest
import torch

from steerdesk.core.datasets import load_bundled
from steerdesk.core.extract import collect, compute_vectors, encode
from steerdesk.core.generate import SamplingSettings, compare
from steerdesk.core.steering import Steering, steers_for

pytestmark = pytest.mark.slow

LAYER = 15
SCALE = 1.0


@pytest.fixture(scope="module")
def rude(smol):
    """neutral_rude split 75/25; vectors from the training part only."""
    train, held = load_bundled("neutral_rude").split(0.25)
    vs = compute_vectors(smol, train)
    return train, held, vs


def test_layer_convention_on_smol(smol):
    enc = encode(smol, [("How are you?", "I am fine, thank you for asking.")])
    reads, _ = collect(smol, enc)
    with torch.inference_mode():
        hs = smol.model(input_ids=torch.tensor([enc[0].ids]), output_hidden_states=True).hidden_states
    assert len(hs) == 31
    for layer in (0, 7, 15, 28):
        torch.testing.assert_close(reads[0, layer], hs[layer + 1][0, -1], atol=1e-4, rtol=1e-4)
    # hidden_states[-1] is after the final norm: far smaller than block 29's output.
    assert hs[-1][0, -1].norm() < 0.5 * reads[0, 29].norm()


def test_vectors_from_neutral_rude(smol, rude):
    train, held, vs = rude
    assert len(held) >= 12 and len(train) + len(held) == len(load_bundled("neutral_rude"))
    assert vs.directions.shape == (30, 576)
    assert torch.isfinite(vs.directions).all() and (vs.norms > 0).all()
    vs.check_compatible(smol.info)
    # On the training examples the target side projects higher at the steering layer...
    assert vs.proj_target[LAYER].mean() > vs.proj_base[LAYER].mean()
    # ...and on held-out examples too.
    unit = vs.directions[LAYER] / vs.directions[LAYER].norm()
    base, _ = collect(smol, encode(smol, held.base_texts), layers=[LAYER])
    target, _ = collect(smol, encode(smol, held.target_texts), layers=[LAYER])
    assert (target[:, 0] @ unit).mean() > (base[:, 0] @ unit).mean()


def test_steered_text_differs_and_is_cache_consistent(smol, rude):
    _, _, vs = rude
    steers = steers_for(vs.directions, [LAYER], scale=SCALE, mode="add")
    sampling = SamplingSettings(max_new_tokens=24)
    prompt = "How do I make a cup of tea?"
    plain, steered = compare(smol, prompt, steers, sampling=sampling)
    assert plain.text.strip() and steered.text.strip()
    assert steered.text != plain.text
    _, steered_nocache = compare(smol, prompt, steers, sampling=sampling, use_cache=False)
    assert steered_nocache.token_ids == steered.token_ids


def _reply_logprobs(lm, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """Mean log-probability per token of each reply after its prompt (chat formatted)."""
    encoded = encode(lm, pairs)
    out = []
    for start in range(0, len(encoded), 8):
        batch = encoded[start:start + 8]
        width = max(len(e.ids) for e in batch)
        ids = torch.full((len(batch), width), lm.tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(batch):  # right padding: positions need no care
            ids[i, :len(e.ids)] = torch.tensor(e.ids)
            mask[i, :len(e.ids)] = 1
        with torch.inference_mode():
            logits = lm.model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None])[..., 0]
        for i, e in enumerate(batch):
            # Token t + 1 is predicted at position t: the reply's tokens are reply_start..len-1.
            out.append(logp[i, e.reply_start - 1:len(e.ids) - 1].mean())
    return torch.stack(out)


def test_heldout_margin_rises_under_steering(smol, rude):
    _, held, vs = rude

    def margins() -> torch.Tensor:
        return _reply_logprobs(smol, held.target_texts) - _reply_logprobs(smol, held.base_texts)

    plain = margins()
    with Steering(smol, steers_for(vs.directions, [LAYER], scale=SCALE)):
        steered = margins()
    assert steered.mean() > plain.mean(), \
        f"target-minus-base log-prob margin {plain.mean():.3f} -> {steered.mean():.3f}"
    # Not carried by one or two examples (measured: 16 of 16 rise, -1.46 -> -0.69 nats/token).
    assert (steered > plain).float().mean() >= 0.75


def test_embedded_model_linear_kernel_matches_stock(smol):
    """load_model picks a CPU linear kernel (core/kernels.py); its logits match aten's."""
    from steerdesk.core.kernels import use_cpu_linear

    assert smol.info.cpu_linear in ("onednn", "aten")
    ids = smol.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    try:
        with torch.inference_mode():
            use_cpu_linear(smol.model, "onednn")
            fast = smol.model(input_ids=ids).logits
            use_cpu_linear(smol.model, "aten")
            stock = smol.model(input_ids=ids).logits
    finally:
        use_cpu_linear(smol.model, smol.info.cpu_linear)
    torch.testing.assert_close(fast, stock, rtol=1e-3, atol=1e-3)
    assert torch.equal(fast[0, -1].argmax(), stock[0, -1].argmax())
