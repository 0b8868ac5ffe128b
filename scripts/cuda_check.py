"""CUDA check of the steering path (run on a GPU machine): dtype/device of hooks, split models, cache.

    python3 scripts/cuda_check.py [TOKENIZER_DIR] [--device cuda] [--cpu] [--only-precision]

TOKENIZER_DIR defaults to ``bench/.gpu_assets`` (``bench/bench_gpu.py --make-assets`` saves the
embedded SmolLM2's tokenizer there). ``--cpu`` runs everything that is meaningful on the CPU (all but
the split-model check); ``--only-precision`` runs check 8 alone.

Builds tiny random Llama models (no downloads), then checks on the device:
1. identity steering (scale 0, random vectors) => bit-identical logits (fp32 and bf16); a zero vector
   at a non-zero scale is refused (a silent no-op, issue 10 item 1);
2. steering at block L shifts hidden_states[L+1] by exactly v (fp32) and leaves block L-1 alone;
3. greedy steered tokens with the KV cache equal those without it (add / project / clamp, all positions);
4. per-row steering in one batch equals separate runs;
5. a bf16 model with a float32 vector runs and keeps bf16;
6. a model split across devices (device_map: half the blocks on cuda:0, half on cpu) steers with
   vectors following each block's device, and gives the same tokens as the unsplit model;
7. compute_vectors + compare() end to end on the device;
8. reduced-precision hook arithmetic (issue 10 item 3): in float16 and bfloat16 models, block
   outputs near the type's limit, steered through ``Steering`` in every mode (add, project,
   clamp; also per-row), equal a float64 evaluation of the float32 formula, cast once to the model's
   dtype; a steered value that truly overflows the dtype raises ``SteerdeskError`` naming the layer
   and the dtype. Each line also says what the same formula computed in the model's own dtype
   gives (NaN/inf or its error), which is what the check guards against.
9. baking (issue 14; ``--only-bake`` runs it alone): a real model (``--bake-model``, default the
   embedded SmolLM2; skipped with a message when none can be loaded -- a random model's flat logits
   make bf16 greedy ties) is loaded in bf16 on the device, ``add`` steering at two layers is baked
   with ``steerdesk.core.bake``; the baked folder, loaded by plain ``from_pretrained``, gives in
   float32 the same 48 greedy tokens (KV cache on) as steerdesk's hooked model and logits within
   1e-4 x (1 + max |logit|); in bfloat16 its logits are as close to the float32 steered logits as
   the hooked bf16 model's (bf16 greedy equality is reported as info: two bf16 roundings of one
   function can part at a near-tie); when ``vllm`` imports, vLLM (offline engine, tensor-parallel
   over the visible GPUs that divide the heads) on the baked folder: same greedy tokens in float32
   (a check), bf16 reported. Written for issue 14 and run on the CPU (``--cpu --only-bake``); NOT
   run on a GPU yet (no GPU in that session).
Prints one line per check and exits non-zero when any failed.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing


def main(argv: list[str] | None = None) -> int:
    """Run the checks; returns 0 when all passed, 1 otherwise."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tokenizer_dir", nargs="?", default=str(Path(__file__).resolve().parent.parent / "bench" / ".gpu_assets"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cpu", action="store_true", help="same as --device cpu")
    ap.add_argument("--only-precision", action="store_true", help="only the reduced-precision hook checks (8)")
    ap.add_argument("--only-bake", action="store_true", help="only the baking checks (9)")
    ap.add_argument("--bake-model", default="default",
                    help="model for the baking checks (folder or id; default: the embedded SmolLM2)")
    args = ap.parse_args(argv)
    tok_dir = args.tokenizer_dir
    device = "cpu" if args.cpu else args.device
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from steerdesk.core.datasets import Dataset, Example
    from steerdesk.core.errors import SteerdeskError
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

    if args.only_bake:
        bake_checks(args.bake_model, device, check)
        print("PASS" if not failures else f"{failures} FAILED", flush=True)
        return 1 if failures else 0
    if args.only_precision:
        precision_checks(load, device, check)
        print("PASS" if not failures else f"{failures} FAILED", flush=True)
        return 1 if failures else 0

    lm = load()
    ids = tok("<|im_start|>user\nTell me a story<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")["input_ids"]
    ids = ids.to(device)
    gen = torch.Generator().manual_seed(1)
    vecs = torch.randn(6, 128, generator=gen) * 4.0
    with torch.inference_mode():
        ref = lm.model(ids).logits
        with Steering(lm, steers_for(vecs, [0, 3, 5], scale=0.0)):
            zero = lm.model(ids).logits
    check("scale 0 leaves fp32 logits bit-identical", torch.equal(ref, zero))
    try:
        Steering(lm, steers_for(torch.zeros(6, 128), [3]))
        check("zero vector at scale 1 is refused", False, "no error")
    except SteerdeskError as exc:
        check("zero vector at scale 1 is refused", True, str(exc))

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
        with Steering(bf, steers_for(vecs, [1, 4], scale=0.0)):
            zero_bf = bf.model(ids).logits
    check("scale 0 leaves bf16 logits bit-identical", torch.equal(ref_bf, zero_bf))

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
    precision_checks(load, device, check)
    bake_checks(args.bake_model, device, check)
    print("PASS" if not failures else f"{failures} FAILED", flush=True)
    return 1 if failures else 0


BAKE_PROMPT = "Tell me about the sea."
BAKE_TOKENS = 48


def _first_difference(a: list[int], b: list[int]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first difference at token {i} ({x} vs {y})"
    return "equal" if len(a) == len(b) else f"lengths {len(a)} vs {len(b)}"


def bake_checks(model_spec: str, device: str, check: Callable[..., None]) -> None:
    """Check 9: baked checkpoint vs steerdesk's hooked model, float32 then bfloat16, and vLLM when installed.

    float32: greedy tokens equal, logits within 1e-4 x (1 + max |logit|). bfloat16: the baked model
    and the hooked model are two different bf16 roundings of the same function (the hook adds
    ``c`` in float32 to the block output and rounds once; the baked bias is rounded to bf16 and
    added inside the MLP), so the check is that the baked model's logits are as close to the
    float32 steered logits as the hooked bf16 model's are (at most 1.5x its error); whether the
    bf16 greedy tokens are equal is reported as an ``info`` line with the first difference.
    """
    import gc
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steerdesk.core.bake import bake
    from steerdesk.core.errors import SteerdeskError
    from steerdesk.core.extract import collect, encode
    from steerdesk.core.models import load_model, wrap_model
    from steerdesk.core.steering import Steering, steers_for

    work = Path(tempfile.mkdtemp(prefix="steerdesk-bake-check-"))
    ref_logits: torch.Tensor | None = None
    ref_tokens: list[int] = []
    steer_v: torch.Tensor | None = None
    try:
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).replace("torch.", "")
            try:
                lm = load_model(model_spec, device=device, dtype=dtype)
            except SteerdeskError as exc:
                print(f"skip baking checks: cannot load {model_spec!r} ({exc}); pass --bake-model FOLDER", flush=True)
                return
            n = lm.info.num_layers
            layers = [n // 3, n // 2]
            if steer_v is None:
                # Directions at half the typical activation norm of each layer: a visible but fluent steering.
                _, norms = collect(lm, encode(lm, [("How are you?", "I am fine, thanks.")]))
                g = torch.Generator().manual_seed(7)
                steer_v = torch.randn(n, lm.info.hidden_size, generator=g)
                steer_v = steer_v / steer_v.norm(dim=-1, keepdim=True) * (0.5 * norms[0].float()).unsqueeze(-1)
            steers = steers_for(steer_v, layers, scale=1.0)
            text = lm.tokenizer.apply_chat_template([{"role": "user", "content": BAKE_PROMPT}],
                                                    add_generation_prompt=True, tokenize=False) \
                if lm.info.has_chat_template else BAKE_PROMPT
            ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(lm.input_device)
            mask = torch.ones_like(ids)
            gen_kw = {"do_sample": False, "max_new_tokens": BAKE_TOKENS, "min_new_tokens": BAKE_TOKENS,
                      "use_cache": True, "pad_token_id": lm.tokenizer.pad_token_id}
            with torch.inference_mode():
                plain = lm.model.generate(ids, attention_mask=mask, **gen_kw)[0, ids.shape[1]:].tolist()
                with Steering(lm, steers):
                    want_logits = lm.model(input_ids=ids).logits.float()
                    want = lm.model.generate(ids, attention_mask=mask, **gen_kw)[0, ids.shape[1]:].tolist()
            out = work / f"baked-{name}"
            t0 = time.perf_counter()
            result = bake(lm, steers, out)
            baked_s = time.perf_counter() - t0
            del lm
            gc.collect()
            model = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype)
            model.to(device)  # type: ignore[arg-type]
            model.eval()
            baked = wrap_model(model, AutoTokenizer.from_pretrained(str(out)), name="baked")
            with torch.inference_mode():
                got_logits = baked.model(input_ids=ids).logits.float()
                got = baked.model.generate(ids, attention_mask=mask, **gen_kw)[0, ids.shape[1]:].tolist()
            diff = float((got_logits - want_logits).abs().max())
            scale = float(want_logits.abs().max())
            check(f"bake ({name}): steering changes the greedy tokens", plain != want, _first_difference(plain, want))
            detail = (f"{_first_difference(got, want)}; max logit diff {diff:.3g} (logits up to {scale:.3g}); "
                      f"bake {baked_s:.1f} s; {result.plan.source_model_type} -> {result.plan.target_model_type}")
            if dtype == torch.float32:
                ref_logits, ref_tokens = want_logits, want
                check("bake (float32): baked checkpoint greedy tokens == hooked steerdesk", got == want, detail)
                check("bake (float32): baked logits within 1e-4 x (1 + max |logit|) of hooked",
                      diff <= 1e-4 * (1 + scale), f"{diff:.3g}")
            else:
                assert ref_logits is not None
                err_hooked = float((want_logits - ref_logits).abs().max())
                err_baked = float((got_logits - ref_logits).abs().max())
                check("bake (bfloat16): baked logits as close to the float32 steered logits as hooked bf16 (<= 1.5x)",
                      err_baked <= 1.5 * err_hooked + 1e-3,
                      f"baked {err_baked:.3g}, hooked {err_hooked:.3g} from float32")
                print(f"info bake (bfloat16): baked greedy tokens vs hooked bf16: {detail}; vs float32 steered: "
                      f"baked {_first_difference(got, ref_tokens)}, hooked {_first_difference(want, ref_tokens)}",
                      flush=True)
            del baked, model
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            _vllm_check(out, ids[0].tolist(), want, name, check)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _vllm_check(folder: Path, prompt_ids: list[int], want: list[int], dtype: str,
                check: Callable[..., None]) -> None:
    """vLLM (offline engine = the server's engine) on the baked folder: same greedy tokens as hooked steerdesk.

    A check in float32; in bfloat16 (other kernels, other roundings) an ``info`` line with the first difference.
    """
    try:
        import vllm  # type: ignore[import-not-found]
        from vllm import LLM, SamplingParams  # type: ignore[import-not-found]
    except ImportError:
        print(f"skip vLLM check ({dtype}): vllm is not installed here", flush=True)
        return
    import json

    config = json.loads((folder / "config.json").read_text())
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    # The largest tensor-parallel size the GPUs allow that divides the heads (SmolLM2-135M: 9 and 3 -> 1 or 3).
    tp = max(t for t in range(1, max(1, torch.cuda.device_count()) + 1) if heads % t == 0 and kv % t == 0)
    llm = LLM(model=str(folder), dtype=dtype, tensor_parallel_size=tp, enforce_eager=True,
              gpu_memory_utilization=0.5, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=len(want), min_tokens=len(want))
    outputs = llm.generate([{"prompt_token_ids": prompt_ids}], params)
    got = list(outputs[0].outputs[0].token_ids)
    label = f"bake ({dtype}): vLLM {vllm.__version__} (tensor_parallel_size={tp}) greedy tokens == hooked steerdesk"
    if dtype == "float32":
        check(label, got == want, _first_difference(got, want))
    else:
        print(f"info {label}: {_first_difference(got, want)}", flush=True)
    del llm


def _steered_output(lm: Any, layer: int, crafted: torch.Tensor, rows: Any) -> torch.Tensor:
    """Block ``layer``'s output after steering with ``rows``, when the block itself outputs ``crafted``.

    A forward hook registered before ``Steering``'s replaces the block's output with ``crafted``
    ``[B, S, H]`` (hooks run in registration order), so the steering hook sees exactly that input;
    one registered after it records what steering returned. The real model runs around it.
    """
    from steerdesk.core.steering import Steering

    def inject(module: Any, args: Any, output: Any) -> Any:
        return (crafted,) + tuple(output[1:]) if isinstance(output, tuple) else crafted

    seen: dict[str, torch.Tensor] = {}

    def record(module: Any, args: Any, output: Any) -> None:
        seen["h"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    ids = torch.full(crafted.shape[:2], 5, dtype=torch.long, device=lm.input_device)
    first = lm.blocks[layer].register_forward_hook(inject)
    try:
        with torch.inference_mode(), Steering(lm, rows):
            last = lm.blocks[layer].register_forward_hook(record)
            try:
                lm.model(input_ids=ids, use_cache=False)
            finally:
                last.remove()
    finally:
        first.remove()
    return seen["h"]


def precision_checks(load: Callable[..., Any], device: str, check: Callable[..., None]) -> None:
    """Check 8: hook arithmetic in float16 / bfloat16 at magnitudes near the type's limit.

    The block output is ``h = c*v^ + n`` (``n`` orthogonal to ``v^``, ``|n_i| = 1e-3 c`` at most), at two
    levels. *Near the limit*: ``c`` makes the largest |h_i| 3/4 of the dtype's largest number; the
    component along the direction, ``h.v^ = c``, is then beyond the dtype (float16: ~1.7e5 > 65504,
    issue 10's case; bfloat16: ~8.7e38, beyond float32 too) although ``h`` and the exact results fit.
    *Moderate*: largest |h_i| = 1000 (a "massive activation"), where the hazard is the mantissa:
    ``project`` cancels ``c*v^`` and keeps ``n``, and an error of 2^-8 c (bfloat16) swamps ``n``.
    Expected value: the mode's formula evaluated in float64 on the exact dtype values of ``h`` (the
    exact result of the float32 formula), cast once to the dtype. Tolerance: 2 ulps of the row's
    largest result plus float32's summation error bound for the dot product
    (``H * 2^-24 * sum|h_i v^_i| * max|v^_i|``).
    """
    from steerdesk.core.errors import SteerdeskError
    from steerdesk.core.steering import Steer

    B, S = 2, 3
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        lm = load(dtype)
        layer, hidden = lm.info.num_layers - 1, lm.info.hidden_size
        gen = torch.Generator().manual_seed(3)
        v = torch.randn(hidden, generator=gen, dtype=torch.float64)
        vhat = v / v.norm()
        fmax = float(torch.finfo(dtype).max)
        eps = float(torch.finfo(dtype).eps)
        signs = torch.tensor([1.0, -1.0], dtype=torch.float64).view(B, 1, 1)
        noise = torch.randn(B, S, hidden, generator=gen, dtype=torch.float64)
        noise = noise - (noise @ vhat)[..., None] * vhat  # orthogonal to the direction
        noise = noise / noise.abs().amax()
        for level, peak in (("near the limit", 0.75 * fmax), ("moderate", 1000.0)):
            c = peak / float(vhat.abs().max())
            h = (signs * c * vhat + 1e-3 * c * noise).to(dtype)  # what the block "outputs", in the model's dtype
            h64 = h.double()
            # add: the result reaches ~95 % of the limit near it (float16), twice |h| at the moderate level
            big_v = v / v.abs().max() * min(0.2 * fmax, peak)
            small_v = v / v.abs().max() * 1e-3 * c  # clamp: a component of the size of n
            cases = [
                ("add", big_v, 1.0, False),
                ("project", v, 1.0, False),  # ablation: the exact result is n, far below c
                ("project", v, 0.5, False),
                ("clamp", small_v, 2.0, False),
                ("clamp", v, 100.0, True),  # normalize: u = v^
            ]
            precision_level(lm, layer, name, dtype, eps, level, h, h64, cases, check)
        # Per-row (near the limit): row 0 projected, row 1 unsteered and bit-identical to the block's output.
        c = 0.75 * fmax / float(vhat.abs().max())
        h = (signs * c * vhat + 1e-3 * c * noise).to(dtype)
        h64 = h.double()
        unit = v.float().double() / v.float().double().norm()
        ref0 = h64[0] - (h64[0] * unit).sum(-1, keepdim=True) * unit
        try:
            out = _steered_output(lm, layer, h.to(lm.input_device), [[Steer(layer, v.float(), 1.0, "project")], []]).cpu()
            sum_bound = hidden * 2.0 ** -24 * (h64[0] * unit).abs().sum(-1, keepdim=True) * unit.abs().max()
            tol = 2 * eps * ref0.abs().amax(-1, keepdim=True) + sum_bound
            err0 = (out[0].double() - ref0.to(dtype).double()).abs()
            same1 = torch.equal(out[1], h[1])
            ok = bool((err0 <= tol).all()) and same1
            check(f"{name} per-row project (row 0) / unsteered (row 1) near the limit", ok,
                  f"row 0 max err {float(err0.max()):.3g} (= {float((err0 / tol).max()):.2f} of the tolerance), "
                  f"row 1 {'bit-identical' if same1 else 'CHANGED'}")
        except SteerdeskError as exc:
            check(f"{name} per-row project (row 0) / unsteered (row 1) near the limit", False, f"refused: {exc}")
        # A result that truly does not fit the dtype: a one-line error naming layer and dtype.
        over = v / v.abs().max() * 0.9 * fmax * signs.view(-1)[0]  # same sign as h's largest component
        try:
            _steered_output(lm, layer, h.to(lm.input_device), [Steer(layer, over.float(), 1.0, "add")])
            check(f"{name} add beyond the limit raises SteerdeskError", False, "no error was raised")
        except SteerdeskError as exc:
            msg = str(exc)
            check(f"{name} add beyond the limit raises SteerdeskError", f"layer {layer}" in msg and name in msg
                  and "\n" not in msg, msg)


def precision_level(lm: Any, layer: int, name: str, dtype: torch.dtype, eps: float, level: str, h: torch.Tensor,
                    h64: torch.Tensor, cases: list[tuple[str, torch.Tensor, float, bool]],
                    check: Callable[..., None]) -> None:
    """One line per (mode, vector, scale, normalize) case of check 8 on the block output ``h``."""
    from steerdesk.core.errors import SteerdeskError
    from steerdesk.core.steering import Steer

    hidden = h.shape[-1]
    for mode, vec, scale, normalize in cases:
        vec = vec.float().double()  # the reference uses exactly the float32 vector steerdesk is given
        u = vec / vec.norm() if normalize else vec
        unit = vec / vec.norm()
        coeff = (h64 * unit).sum(-1, keepdim=True)
        if mode == "add":
            ref = h64 + scale * u
        elif mode == "project":
            ref = h64 - scale * coeff * unit
        else:
            ref = h64 - coeff * unit + scale * u
        steer = Steer(layer, vec.float(), float(scale), mode, normalize)
        label = f"{name} {level}: {mode} x{scale:g}{' normalize' if normalize else ''} at |h|max {float(h64.abs().max()):.3g}" \
                f", h.v^ {float(coeff.abs().max()):.3g}"
        try:
            out = _steered_output(lm, layer, h.to(lm.input_device), [steer]).cpu()
        except SteerdeskError as exc:
            check(f"{label}: steered == float64 reference", False, f"refused: {exc}")
            continue
        err = (out.double() - ref.to(dtype).double()).abs()
        sum_bound = hidden * 2.0 ** -24 * (h64 * unit).abs().sum(-1, keepdim=True) * unit.abs().max()
        tol = 2 * eps * ref.abs().amax(-1, keepdim=True) + (0 if mode == "add" else sum_bound)
        # The same formula in the model's own dtype, for information (what float32 guards against).
        hd, ud, unitd = h, u.to(dtype), unit.to(dtype)
        coeffd = (hd * unitd).sum(-1, keepdim=True)
        native = (hd + scale * ud if mode == "add" else hd - scale * coeffd * unitd if mode == "project"
                  else hd - coeffd * unitd + scale * ud).double()
        native_note = ("non-finite" if not bool(torch.isfinite(native).all())
                       else f"max rel err {float(((native - ref).abs() / tol).max()):.3g} tolerances")
        ok = out.dtype == dtype and bool(torch.isfinite(out).all()) and bool((err <= tol).all())
        check(f"{label}: steered == float64 reference", ok,
              f"max err {float(err.max()):.3g} (= {float((err / tol).max()):.2f} of the tolerance); "
              f"in {name} arithmetic: {native_note}")


if __name__ == "__main__":
    raise SystemExit(main())
