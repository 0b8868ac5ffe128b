"""Baked checkpoints equal the hooked model, checked in a fresh process that never imports steerdesk.

For each tiny family that can be baked (and the real SmolLM2, slow), ``add`` steering at two
layers is baked; a subprocess loads the folder with plain ``AutoModelForCausalLM.from_pretrained``
(float32), computes logits on fixed ids and 64 greedy tokens with the KV cache, and this process
compares them with the hooked source model: logits within 1e-4, tokens identical. Every
parameter of the tiny models is randomised first (biases and norm weights included), so a
re-expression that dropped Qwen2's q/k/v biases or swapped Phi-3's gate and up halves would fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from tinylm import HIDDEN, NUM_LAYERS, build_tiny, strong_vectors

from steerdesk.core.bake import SIDECAR, bake, plan_bake
from steerdesk.core.models import wrap_model
from steerdesk.core.steering import Steering, steers_for

BAKEABLE = ("llama", "mistral", "qwen2", "phi3", "gpt2", "gptneox", "phi")
LAYERS = (1, 2)
NEW_TOKENS = 64
IDS = [1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 198, 42, 7, 900, 2113]

# Runs in a fresh interpreter: plain transformers only; fails if steerdesk gets imported.
LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)
    folders, ids, new = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    out = {}
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.eval()
        x = torch.tensor([ids])
        with torch.inference_mode():
            logits = model(input_ids=x).logits[0]
            gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                                 min_new_tokens=new, use_cache=True, pad_token_id=0)
        out[folder] = {"class": type(model).__name__, "logits": logits.tolist(),
                       "tokens": gen[0, len(ids):].tolist()}
    assert "steerdesk" not in sys.modules, "the loader imported steerdesk"
    print(json.dumps(out))
""")


def load_fresh(folders: list[Path], ids: list[int] = IDS, new: int = NEW_TOKENS) -> dict[str, Any]:
    """Logits ``[S, vocab]`` and ``new`` greedy tokens of each folder, computed by a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps([str(f) for f in folders]), json.dumps(ids),
                           str(new)], check=False, capture_output=True, text=True, env=env,
                          cwd=str(folders[0].parent),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hooked(lm: Any, steers: list[Any], ids: list[int] = IDS, new: int = NEW_TOKENS) -> dict[str, Any]:
    """The same numbers from the source model with steerdesk's hooks (empty ``steers``: unsteered)."""
    x = torch.tensor([ids], device=lm.input_device)
    with torch.inference_mode(), Steering(lm, steers):
        logits = lm.model(input_ids=x).logits[0].float().cpu()
        gen = lm.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                                min_new_tokens=new, use_cache=True, pad_token_id=0)
    return {"logits": logits, "tokens": gen[0, len(ids):].tolist()}


def tiny_phi(tokenizer: Any) -> Any:
    """A tiny phi-2 style model (parallel attention + MLP, partial rotary 0.5, LayerNorm, biases)."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.PhiConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=128,
                      num_hidden_layers=NUM_LAYERS, num_attention_heads=4, max_position_embeddings=512,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return wrap_model(model, tokenizer, name="tiny-phi")


def randomise(lm: Any, seed: int = 3) -> Any:
    """Give every parameter random values (biases and norm weights too), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("norm" in name or "ln" in name):
                p.copy_(1.0 + 0.3 * noise)  # norm weights near 1, not all 1
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.add_(0.02 * noise)
    return lm


@pytest.fixture(scope="module")
def baked_tiny(tmp_path_factory, tokenizer, plain_tokenizer):
    """Every bakeable tiny family baked once; the fresh-process numbers of all folders in one run."""
    root = tmp_path_factory.mktemp("baked")
    cases: dict[str, Any] = {}
    for arch in BAKEABLE:
        if arch == "phi":
            lm = tiny_phi(plain_tokenizer)
        else:
            lm = build_tiny(arch, tokenizer, plain_tokenizer)
        randomise(lm)
        steers = steers_for(strong_vectors(lm, factor=2.0), list(LAYERS), scale=1.5)
        result = bake(lm, steers, root / arch)
        cases[arch] = {"lm": lm, "steers": steers, "result": result, "folder": root / arch,
                       "hooked": hooked(lm, steers), "plain": hooked(lm, [])}
    fresh = load_fresh([c["folder"] for c in cases.values()])
    for case in cases.values():
        case["fresh"] = fresh[str(case["folder"])]
    return cases


@pytest.mark.parametrize("arch", BAKEABLE)
def test_baked_checkpoint_equals_hooked_model(baked_tiny, arch):
    case = baked_tiny[arch]
    fresh_logits = torch.tensor(case["fresh"]["logits"])
    want = case["hooked"]["logits"]
    diff = float((fresh_logits - want).abs().max())
    assert diff < 1e-4, f"{arch}: baked logits differ from the hooked model's by {diff:.3g}"
    assert case["fresh"]["tokens"] == case["hooked"]["tokens"], f"{arch}: greedy tokens differ"
    assert len(case["fresh"]["tokens"]) == NEW_TOKENS
    # The steering matters here (else the test could not fail): far above the tolerance.
    assert float((want - case["plain"]["logits"]).abs().max()) > 1e-2
    assert case["hooked"]["tokens"] != case["plain"]["tokens"]
    # The in-process self-check saw the same exactness.
    assert case["result"].max_logit_diff < 1e-4


@pytest.mark.parametrize("arch", BAKEABLE)
def test_baked_folder_is_a_plain_hf_checkpoint_with_metadata(baked_tiny, arch):
    case = baked_tiny[arch]
    folder: Path = case["folder"]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", SIDECAR} <= names
    assert any(n.endswith(".safetensors") for n in names)
    assert not any(p.name.startswith(".") for p in folder.parent.iterdir()), "temporary folders left behind"
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config  # no remote code
    meta = json.loads((folder / SIDECAR).read_text())
    assert config["steerdesk_bake"] == meta
    assert meta["format"] == "steerdesk.bake/1"
    assert meta["layers"] == list(LAYERS) and meta["mode"] == "add" and meta["scale"] == 1.5
    assert meta["source"]["architecture"] == case["lm"].info.architecture
    expected_class = {"gpt2": "GPT2LMHeadModel", "gptneox": "GPTNeoXForCausalLM",
                      "phi": "PhiForCausalLM"}.get(arch, "LlamaForCausalLM")
    assert case["fresh"]["class"] == expected_class
    assert meta["re_expressed"] == (arch in ("mistral", "qwen2", "phi3"))
    assert meta["exact_up_to_tokens"] is None  # the tiny models have no sliding window
    if "rope_parameters" in config:  # readers built for transformers 4 find the same theta
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]


def test_sliding_window_is_a_stated_limit(fresh_tiny):
    """Mistral / Phi-3 with a window shorter than their context: baked, with the limit written down."""
    import transformers as T

    lm = fresh_tiny("mistral")
    steers = steers_for(strong_vectors(lm), [1])
    lm.model.config.sliding_window = 32
    try:
        plan = plan_bake(lm, steers)
    finally:
        lm.model.config.sliding_window = None
    assert plan.max_tokens == 32 and any("32 tokens" in n for n in plan.notes)
    # Qwen2's window only counts when a layer uses it.
    cfg = T.Qwen2Config(sliding_window=16, use_sliding_window=False, num_hidden_layers=2)
    from steerdesk.core.bake import window_limit

    assert window_limit(cfg) is None
    assert window_limit(T.Qwen2Config(sliding_window=16, use_sliding_window=True, max_window_layers=0,
                                       num_hidden_layers=2)) == 16


def test_normalize_and_several_steers_per_layer_compose(fresh_tiny, tmp_path):
    """Two steers at one layer (one normalised) + one elsewhere; scale-0 steers are skipped."""
    from steerdesk.core.steering import Steer

    lm = randomise(fresh_tiny("llama"))
    v = strong_vectors(lm)
    steers = [Steer(1, v[1], 2.0, normalize=True), Steer(1, v[2], -0.5), Steer(3, v[3], 0.7),
              Steer(2, v[2], 0.0)]
    result = bake(lm, steers, tmp_path / "out")
    assert result.plan.layers == (1, 3) and any("scale 0" in n for n in result.plan.notes)
    assert result.max_logit_diff < 1e-4
    assert [s["layer"] for s in result.metadata["steers"]] == [1, 1, 3]


def test_baked_copy_shares_nothing_it_changes(fresh_tiny, tmp_path):
    """Baking leaves the loaded model untouched (same logits, no new bias, no hooks)."""
    lm = fresh_tiny("gpt2")
    steers = steers_for(strong_vectors(lm), [2])
    x = torch.tensor([IDS])
    with torch.inference_mode():
        before = lm.model(input_ids=x).logits.clone()
    bias_before = lm.blocks[2].mlp.c_proj.bias.clone()
    bake(lm, steers, tmp_path / "out")
    with torch.inference_mode():
        after = lm.model(input_ids=x).logits
    assert torch.equal(before, after) and torch.equal(bias_before, lm.blocks[2].mlp.c_proj.bias)


@contextmanager
def stock_linear(model: Any) -> Iterator[None]:
    """Run ``model``'s linear layers on torch's stock kernel (as the fresh process does), then restore.

    steerdesk may route CPU linears through oneDNN (core/kernels.py); on SmolLM2 (logits up to 36)
    oneDNN vs the stock kernel alone moves the logits by ~1e-4 (measured 1.07e-4 against 5.1e-5 on
    the same kernel), which would hide what the bake itself does.
    """
    from steerdesk.core.kernels import OneDNNLinear

    switched = [m for m in model.modules() if type(m) is OneDNNLinear]
    for m in switched:
        m.__class__ = torch.nn.Linear
    try:
        yield
    finally:
        for m in switched:
            m.__class__ = OneDNNLinear


@pytest.mark.slow
def test_smollm2_baked_equals_hooked(smol, tmp_path):
    """The embedded SmolLM2 (Llama, tied embeddings): mlp_bias switched on, c at two layers."""
    from tinylm import typical_norms

    g = torch.Generator().manual_seed(5)
    v = torch.randn(smol.info.num_layers, smol.info.hidden_size, generator=g)
    v = v / v.norm(dim=-1, keepdim=True) * (0.5 * typical_norms(smol)).unsqueeze(-1)
    steers = steers_for(v, [10, 15], scale=1.0)
    text = smol.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about the sea."}],
                                              add_generation_prompt=True, tokenize=False)
    ids = smol.tokenizer(text, add_special_tokens=False)["input_ids"]
    with stock_linear(smol.model):
        result = bake(smol, steers, tmp_path / "smol-baked")
        want = hooked(smol, steers, ids)
        plain = hooked(smol, [], ids)
    assert result.plan.target_model_type == "llama" and not result.plan.re_expressed
    fresh = load_fresh([tmp_path / "smol-baked"], ids)[str(tmp_path / "smol-baked")]
    diff = float((torch.tensor(fresh["logits"]) - want["logits"]).abs().max())
    assert diff < 1e-4, f"SmolLM2: baked logits differ by {diff:.3g}"
    assert fresh["tokens"] == want["tokens"]
    assert want["tokens"] != plain["tokens"]  # the steering changes the text
    config = json.loads((tmp_path / "smol-baked" / "config.json").read_text())
    assert config["mlp_bias"] is True and config["tie_word_embeddings"] is True



@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                   "rope_theta": 50000.0}])
def test_llama_with_scaled_rope_round_trips(tokenizer, tmp_path, rope):
    """A non-default RoPE survives the legacy keys written next to rope_parameters (reloaded, same logits)."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=128,
                        num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512, rope_parameters=dict(rope))
    lm = randomise(wrap_model(T.AutoModelForCausalLM.from_config(cfg).eval(), tokenizer, name="tiny-rope"))
    steers = steers_for(strong_vectors(lm), [2])
    bake(lm, steers, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_theta"] == rope["rope_theta"] and config["rope_scaling"]["rope_type"] == rope["rope_type"]
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert reloaded.config.rope_parameters == lm.model.config.rope_parameters
    ids = list(range(5, 205))  # longer than original_max_position_embeddings
    got = hooked(wrap_model(reloaded, tokenizer), [], ids, new=2)
    want = hooked(lm, steers, ids, new=2)
    assert float((got["logits"] - want["logits"]).abs().max()) < 1e-4


def test_sliding_window_limit_is_where_exactness_ends(tokenizer, plain_tokenizer, tmp_path):
    """Mistral with a 12-token window, re-expressed as Llama: exact for 12 tokens, not for 13."""
    import transformers as T

    lm = build_tiny("mistral", tokenizer, plain_tokenizer)
    lm.model.config.sliding_window = 12
    try:
        randomise(lm)
        steers = steers_for(strong_vectors(lm), [1, 2])
        result = bake(lm, steers, tmp_path / "out")
        assert result.plan.max_tokens == 12 and result.metadata["exact_up_to_tokens"] == 12
        reloaded = wrap_model(T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval(),
                              tokenizer)
        for length, exact in ((12, True), (13, False)):
            ids = IDS[:length] if length <= len(IDS) else (IDS * 2)[:length]
            diff = float((hooked(reloaded, [], ids, new=1)["logits"] - hooked(lm, steers, ids, new=1)["logits"])
                         .abs().max())
            assert (diff < 1e-4) == exact, f"{length} tokens: {diff:.3g}"
    finally:
        lm.model.config.sliding_window = None


def test_tied_qwen2_is_re_expressed_with_tied_embeddings(tokenizer, tmp_path):
    """Small Qwen2 models tie the LM head to the embedding: the Llama form keeps the tie."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.Qwen2Config(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=128,
                        num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512, tie_word_embeddings=True)
    lm = randomise(wrap_model(T.AutoModelForCausalLM.from_config(cfg).eval(), tokenizer, name="tiny-qwen2-tied"))
    steers = steers_for(strong_vectors(lm), [0, 3], scale=-1.0)
    bake(lm, steers, tmp_path / "out")
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM" and reloaded.config.tie_word_embeddings
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    got = hooked(wrap_model(reloaded, tokenizer), [])
    want = hooked(lm, steers)
    assert float((got["logits"] - want["logits"]).abs().max()) < 1e-4 and got["tokens"] == want["tokens"]
