"""CUDA check of the steering path (run on a GPU machine): dtype/device of hooks, split models, cache.

    python3 scripts/cuda_check.py TOKENIZER_DIR [--device cuda]

Builds tiny random Llama models (no downloads), then checks on the device:
1. zero vector => bit-identical logits (fp32 and bf16);
2. steering at block L shifts hidden_states[L+1] by exactly v (fp32) and leaves block L-1 alone;
3. greedy steered tokens with the KV cache equal those without it (add / project / clamp, all positions);
4. per-row steering in one batch equals separate runs;
5. a bf16 model with a float32 vector runs and keeps bf16;
6. a model split across devices (device_map: half the blocks on cuda:0, half on cpu) steers with
   vectors following each block's device, and gives the same tokens as the unsplit model;
7. compute_vectors + compare() end to end on the device.
Prints one line per check and exits non-zero on the first failure.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch


def main() -> int:
    tok_dir = sys.argv[1]
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from steerdesk.core.datasets import Dataset, Example
    from steerdesk.core.extract import compute_vectors
    from steerdesk.core.generate import SamplingSettings, compare, generate
    from steerdesk.core.models import wrap_model
    from steerdesk.core.steering import Steer, Steering, steers_for

    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(0)})" if device.startswith("cuda") else ""), flush=True)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    base_model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    folder = tempfile.mkdtemp()
    base_model.save_pretrained(folder)
    tok.save_pretrained(folder)

    def load(dtype=torch.float32, device_map=None):
        kw = {"dtype": dtype, "attn_implementation": "eager"}
        if device_map is not None:
            kw["device_map"] = device_map
        m = AutoModelForCausalLM.from_pretrained(folder, **kw).eval()
        if device_map is None:
            m.to(device)
        return wrap_model(m, AutoTokenizer.from_pretrained(folder), name="tiny")

    failures = 0

    def check(name, ok, detail=""):
        nonlocal failures
        print(f"{'ok  ' if ok else 'FAIL'} {name}{(': ' + detail) if detail else ''}", flush=True)
        failures += 0 if ok else 1

    lm = load()
    ids = tok("<|im_start|>user\nTell me a story<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")["input_ids"]
    ids = ids.to(device)
    gen = torch.Generator().manual_seed(1)
    vecs = torch.randn(6, 128, generator=gen) * 4.0
    with torch.inference_mode():
        ref = lm.model(ids).logits
        with Steering(lm, steers_for(torch.zeros(6, 128), [0, 3, 5])):
            zero = lm.model(ids).logits
    check("zero vector leaves fp32 logits bit-identical", torch.equal(ref, zero))

    with torch.inference_mode():
        hs = lm.model(ids, output_hidden_states=True).hidden_states
    lm2 = load()  # fresh model: output_hidden_states installs capture hooks lazily
    with torch.inference_mode(), Steering(lm2, [Steer(2, vecs[2])]):
        hs2 = lm2.model(ids, output_hidden_states=True).hidden_states
    shift = (hs2[3] - hs[3])
    check("add at block 2 shifts hidden_states[3] by v", torch.allclose(shift, vecs[2].to(device).expand_as(shift),
                                                                          atol=1e-4),
          f"max err {float((shift - vecs[2].to(device)).abs().max()):.2e}")
    check("blocks before 2 untouched", torch.equal(hs[2], hs2[2]))

    s = SamplingSettings(max_new_tokens=16)
    for mode in ("add", "project", "clamp"):
        for pos in ("all", "prompt", "generated"):
            st = [Steer(2, vecs[2], 1.0, mode, mode != "add", pos), Steer(4, vecs[4], 0.5, mode, False, pos)]
            a = generate(lm, ["Tell me a story"], st, sampling=s, use_cache=True)[0].token_ids
            b = generate(lm, ["Tell me a story"], st, sampling=s, use_cache=False)[0].token_ids
            check(f"cache on == cache off ({mode}, {pos})", a == b)
    plain = generate(lm, ["Tell me a story"], [], sampling=s)[0].token_ids
    steered = generate(lm, ["Tell me a story"], [Steer(2, vecs[2], 2.0)], sampling=s)[0].token_ids
    check("steering changes greedy tokens", plain != steered)

    prompts = ["Tell me a story", "Tell me a story", "A longer prompt about the weather and the sea"]
    rows = [[], [Steer(1, vecs[1], 2.0)], [Steer(4, vecs[4], 1.0, "clamp", True)]]
    batched = generate(lm, prompts, rows, sampling=s)
    alone = [generate(lm, [p], r, sampling=s)[0] for p, r in zip(prompts, rows)]
    check("per-row steering == separate runs", [x.token_ids for x in batched] == [x.token_ids for x in alone])

    bf = load(torch.bfloat16)
    with torch.inference_mode(), Steering(bf, [Steer(3, vecs[3].float(), 1.0)]):
        out = bf.model(ids).logits
    check("bf16 model + fp32 vector keeps bf16", out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all()))
    with torch.inference_mode():
        ref_bf = bf.model(ids).logits
        with Steering(bf, steers_for(torch.zeros(6, 128), [1, 4])):
            zero_bf = bf.model(ids).logits
    check("zero vector leaves bf16 logits bit-identical", torch.equal(ref_bf, zero_bf))

    if device.startswith("cuda"):
        dm = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": "cpu", "lm_head": "cpu"}
        dm.update({f"model.layers.{i}": (0 if i < 3 else "cpu") for i in range(6)})
        split = load(device_map=dm)
        devices = sorted({str(p.device) for p in split.model.parameters()})
        st = [Steer(1, vecs[1], 1.5), Steer(4, vecs[4], 1.5)]  # one vector per device
        a = generate(split, ["Tell me a story"], st, sampling=s)[0].token_ids
        b = generate(lm, ["Tell me a story"], st, sampling=s)[0].token_ids
        check("split model (device_map) steers with vectors on each block's device", a == b,
              f"devices {devices}")

    ds = Dataset([Example("Hi?", "Hello, how can I help?", "Ugh, what now?"),
                  Example("Time?", "It is noon.", "Look at a clock, genius."),
                  Example("Weather?", "It looks sunny today.", "Look outside, obviously.")], name="tiny")
    t0 = time.perf_counter()
    vs = compute_vectors(lm, ds, batch_size=2)
    u, st_ = compare(lm, "How are you?", steers_for(vs.directions, [3], scale=8.0), sampling=s)
    check("compute + compare on the device", vs.directions.device.type == "cpu" and bool(u.token_ids),
          f"{time.perf_counter() - t0:.2f} s")
    print("PASS" if not failures else f"{failures} FAILED", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
