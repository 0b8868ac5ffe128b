"""GPU benchmark (issue 11 item 5): steerdesk's core on a random-initialised model of realistic shape.

The model is built from a config, never downloaded: the shape of SmolLM2-1.7B (Llama
architecture, 24 blocks, hidden 2048, 32 attention heads without grouping, MLP 8192, SmolLM2's
49152-token vocabulary, tied embeddings; 1.71 B parameters) with seeded random weights, in bfloat16,
built directly on the GPU. The tokenizer is the embedded SmolLM2's, saved once into the git-ignored
folder ``bench/.gpu_assets/`` (``--make-assets``) so it can travel to a machine without the ``gguf``
package or a network. The model is wrapped with :func:`steerdesk.core.models.wrap_model` (what
``load_model`` does after loading) and every phase calls steerdesk's own code:

``gen``      128 greedy tokens of one prompt, batch 1: ``generate`` steered (``add`` at the middle
             block) vs unsteered, alternating (ABBA), ratio = median of the per-pair tok/s ratios.
``batch``    32 different prompts x 64 steered greedy tokens: one ``generate`` call vs 32 calls,
             order batched, sequential, batched; ratio = sequential wall time / mean batched time.
``sweep``    ``steerdesk.core.sweep.sweep`` vs the naive loop (``TextScorer.score`` one configuration
             at a time, full forward passes) on 16 held-out ``neutral_rude`` pairs, every layer x
             scales 0/0.5/1/1.5/2, order shipped, naive, shipped (as ``bench/bench_sweep.py``);
             also the ratio without the scale-0 column and max |naive - sweep|.
``extract``  ``compute_vectors`` on 1000 contrast pairs (2000 texts; ``neutral_rude`` with distinct
             prompt suffixes), batch 8 (the CLI and window default) vs batch 32, alternating;
             pairs/s of each, the ratio, and the smallest per-layer cosine between the two results.

The scores and texts of a random model are meaningless; the compute (shapes, token counts, code
paths) is that of a real 1.7 B model. Time guard: a total budget (``--budget``, default 300 s) is
shared among the phases (unused time flows to later phases); before each timed call the script
estimates its duration from a warm-up and skips what would not fit, saying so in the result. The
result so far is written after every phase (and on SIGTERM), so a run cut short still leaves its
numbers. Output: one JSON object on stdout, also written to ``$OUT/bench_gpu.json`` when ``OUT`` is
set (or ``--json PATH``); progress lines on stderr.

Usage::

    .venv/bin/python bench/bench_gpu.py --make-assets      # once, here: tokenizer -> bench/.gpu_assets/
    PYTHONPATH=. python3 bench/bench_gpu.py                # on the GPU machine (cuda, bfloat16)
    .venv/bin/python bench/bench_gpu.py --smoke            # tiny config on the CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ASSETS = ROOT / "bench" / ".gpu_assets"

# SmolLM2-1.7B's published shape (HuggingFaceTB/SmolLM2-1.7B config.json); vocabulary from the tokenizer.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, max_position_embeddings=8192, tie_word_embeddings=True,
                         rms_norm_eps=1e-5),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5),
}
SCALES = [0.0, 0.5, 1.0, 1.5, 2.0]
from bench_core import BATCH_PROMPTS, GEN_PROMPT  # noqa: E402 - the same prompts as the CPU benchmark

PROMPT_VARIANTS = ["", " Keep it simple.", " Use vivid details.", " Write it for a child."]
PAIR_SUFFIXES = ["", " I'm asking for a friend.", " Please keep it short.", " Thanks in advance.",
                 " Quick question.", " Be honest.", " This is for school.", " Sorry to bother you.",
                 " I need this today.", " Explain it simply.", " My boss asked me.", " Just curious.",
                 " Be brief.", " Any tips?", " It is urgent.", " Please help."]
# Shares of the total budget (renormalised over the phases still to run).
PHASE_SHARES = {"gen": 0.15, "batch": 0.35, "sweep": 0.3, "extract": 0.2}


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries only the JSON result)."""
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ============================================================================ set-up

def make_assets(folder: Path = ASSETS) -> Path:
    """Save the embedded SmolLM2's tokenizer files into ``folder`` (run where steerdesk's venv is).

    Uses the safetensors copy steerdesk converts once into its cache folder (converting it first
    through ``load_model`` when it is not there yet). Returns ``folder``. Raises ``SteerdeskError``
    when the embedded model is not installed.
    """
    from transformers import AutoTokenizer

    from steerdesk.core.models import _gguf_cache_folder, load_model, resolve_source

    src_folder, gguf_file = resolve_source("default")
    cached = _gguf_cache_folder(src_folder, gguf_file)  # type: ignore[arg-type]
    if not (cached / "tokenizer.json").is_file():
        load_model("default")  # converts the GGUF once into the cache folder
    tok = AutoTokenizer.from_pretrained(str(cached))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    (folder / "README.txt").write_text(
        "Tokenizer of the embedded SmolLM2-135M-Instruct, saved by bench/bench_gpu.py --make-assets\n"
        "for runs on machines without the gguf package (git-ignored through .git/info/exclude).\n")
    return folder


def load_tokenizer(folder: Path) -> tuple[Any, str]:
    """The tokenizer saved in ``folder``: ``AutoTokenizer``, or a plain fast tokenizer built from
    ``tokenizer.json`` when this transformers cannot read the saved config. Returns (tokenizer, how)."""
    if not (folder / "tokenizer.json").is_file():
        raise SystemExit(f"no tokenizer in {folder}: run 'bench/bench_gpu.py --make-assets' where steerdesk's "
                         f"venv is, and carry bench/.gpu_assets")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(folder)), "AutoTokenizer"
    except Exception as exc:  # noqa: BLE001 - an older transformers may not know the saved class name
        log(f"AutoTokenizer failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            f"building the tokenizer from tokenizer.json")
    cfg = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() \
        else {}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                  **{k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in cfg})
    template = folder / "chat_template.jinja"
    if template.is_file():
        tok.chat_template = template.read_text()
    return tok, "PreTrainedTokenizerFast(tokenizer.json)"


def build_model(shape: str, device: str, dtype_name: str, tok: Any) -> Any:
    """Seeded random-weight Llama of the named shape, built on ``device``, wrapped as steerdesk does."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from steerdesk.core.models import pick_dtype, wrap_model

    dtype = pick_dtype(dtype_name, device)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - fall back to building on the CPU and moving
        log(f"building on {device} failed ({type(exc).__name__}: {exc}); building on the CPU")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    if next(model.parameters()).device.type != torch.device(device).type:  # the device context was not honoured
        log(f"the model was built on {next(model.parameters()).device}; moving it to {device}")
        model.to(device)
    model.eval().requires_grad_(False)
    return wrap_model(model, tok, name=f"{shape} shape, random weights", source="random")


def sync(lm: Any) -> None:
    """Wait for the GPU (timings must include the device's work)."""
    import torch

    if lm.input_device.type == "cuda":
        torch.cuda.synchronize()


def timed(lm: Any, fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, value) of ``fn()``, the device synchronised on both sides."""
    sync(lm)
    t0 = time.perf_counter()
    value = fn()
    sync(lm)
    return time.perf_counter() - t0, value


class Budget:
    """A total time budget shared among named phases; unused time flows to later phases."""

    def __init__(self, total: float, shares: dict[str, float]):
        self.t0 = time.perf_counter()
        self.total = total
        self.shares = dict(shares)
        self.phase_end = self.t0 + total

    def left(self) -> float:
        """Seconds left in the whole run."""
        return self.t0 + self.total - time.perf_counter()

    def start(self, phase: str) -> float:
        """Open ``phase``: its deadline is its share of the time left among the phases still to run."""
        share = self.shares.pop(phase)
        part = share / (share + sum(self.shares.values()))
        self.phase_end = time.perf_counter() + max(0.0, self.left()) * part
        return self.phase_end - time.perf_counter()

    def phase_left(self) -> float:
        """Seconds left in the current phase."""
        return self.phase_end - time.perf_counter()

    def fits(self, estimate: float, margin: float = 1.15) -> bool:
        """Whether a call estimated at ``estimate`` s fits in the current phase."""
        return estimate * margin <= self.phase_left()


def tokens_of(result: Any) -> int:
    """Tokens a generation produced, counting a final EOS (it was computed too)."""
    return len(result.token_ids) + (1 if result.finish_reason == "eos" else 0)


def median_ratio(num: Sequence[float], den: Sequence[float]) -> float | None:
    """Median of per-pair ratios ``num[i] / den[i]`` (None without a pair)."""
    pairs = [a / b for a, b in zip(num, den) if b]
    return statistics.median(pairs) if pairs else None


# ============================================================================ phases

def phase_gen(lm: Any, directions: Any, budget: Budget, smoke: bool) -> dict[str, Any]:
    """Steered vs unsteered greedy generation of one prompt, batch 1, alternating."""
    from steerdesk.core.generate import SamplingSettings, generate
    from steerdesk.core.steering import steers_for

    n_new = 16 if smoke else 128
    layer = lm.info.num_layers // 2
    steers = steers_for(directions, [layer], scale=1.0)
    sampling = SamplingSettings(max_new_tokens=n_new)
    methods = {
        "steered": lambda: generate(lm, [GEN_PROMPT], steers, sampling=sampling)[0],
        "unsteered": lambda: generate(lm, [GEN_PROMPT], None, sampling=sampling)[0],
    }
    warm = {name: timed(lm, fn)[0] for name, fn in methods.items()}  # also the estimates
    est = max(warm.values())
    tps: dict[str, list[float]] = {k: [] for k in methods}
    secs: dict[str, list[float]] = {k: [] for k in methods}
    toks: dict[str, list[int]] = {k: [] for k in methods}
    ids: dict[str, list[int]] = {}
    max_reps = 2 if smoke else 5
    skipped = None
    for rep in range(max_reps):
        if not budget.fits(2 * est):
            skipped = f"stopped after {rep} pairs: {budget.phase_left():.0f} s left in the phase"
            break
        for name in (["steered", "unsteered"] if rep % 2 == 0 else ["unsteered", "steered"]):
            dt, r = timed(lm, methods[name])
            n = tokens_of(r)
            tps[name].append(n / dt)
            secs[name].append(dt)
            toks[name].append(n)
            ids[name] = r.token_ids
            est = max(est, dt)
            log(f"gen rep {rep + 1} {name:9s} {n} tok in {dt:.2f} s = {n / dt:.1f} tok/s")
    return {
        "what": f"{n_new} greedy tokens of one prompt, batch 1; steered = add at block {layer} (scale 1, "
                f"direction from neutral_rude) vs unsteered; KV cache on; alternating ABBA",
        "max_new_tokens": n_new,
        "steer_layer": layer,
        "warmup_seconds": warm,
        "seconds": secs,
        "tokens": toks,
        "tokens_per_s": tps,
        "median_tokens_per_s": {k: statistics.median(v) if v else None for k, v in tps.items()},
        "median_ms_per_token": {k: 1000 / statistics.median(v) if v else None for k, v in tps.items()},
        "ratio_steered_over_unsteered_tok_s": median_ratio(tps["steered"], tps["unsteered"]),
        "steered_differs_from_unsteered": (ids.get("steered") != ids.get("unsteered")) if ids else None,
        "stopped_early": skipped,
    }


def batch_prompts(n: int) -> list[str]:
    """``n`` different prompts (8 topics x 4 wordings, cycled)."""
    all_prompts = [p + v for v in PROMPT_VARIANTS for p in BATCH_PROMPTS]
    return [all_prompts[i % len(all_prompts)] for i in range(n)]


def phase_batch(lm: Any, directions: Any, budget: Budget, smoke: bool) -> dict[str, Any]:
    """32 prompts steered in one ``generate`` call vs one call per prompt."""
    from steerdesk.core.generate import SamplingSettings, generate
    from steerdesk.core.steering import steers_for

    n_prompts = 4 if smoke else 32
    n_new = 8 if smoke else 64
    layer = lm.info.num_layers // 2
    steers = steers_for(directions, [layer], scale=1.0)
    sampling = SamplingSettings(max_new_tokens=n_new)
    prompts = batch_prompts(n_prompts)

    def batched(ps: list[str]) -> list[Any]:
        return generate(lm, ps, steers, sampling=sampling)

    def sequential(ps: list[str]) -> list[Any]:
        return [generate(lm, [p], steers, sampling=sampling)[0] for p in ps]

    t_one, _ = timed(lm, lambda: sequential(prompts[:1]))  # warm-up + estimate of one sequential prompt
    t_b0, _ = timed(lm, lambda: batched(prompts))  # warm-up + estimate of the batched call
    # Budget: batched twice + sequential once; fewer prompts (same for both) when that does not fit.
    n = n_prompts
    while n > 1 and not budget.fits(n * t_one + 2 * t_b0 * n / n_prompts):
        n //= 2
    if n < n_prompts:
        log(f"batch: {n_prompts} prompts do not fit the phase ({budget.phase_left():.0f} s left); using {n}")
        prompts = prompts[:n]
    t_b1, res_b = timed(lm, lambda: batched(prompts))
    log(f"batch: batched {len(prompts)} prompts in {t_b1:.2f} s")
    t_s, res_s = timed(lm, lambda: sequential(prompts))
    log(f"batch: sequential {len(prompts)} prompts in {t_s:.2f} s")
    t_b2, _ = timed(lm, lambda: batched(prompts))
    log(f"batch: batched again in {t_b2:.2f} s")
    t_b = (t_b1 + t_b2) / 2
    tok_b = sum(tokens_of(r) for r in res_b)
    tok_s = sum(tokens_of(r) for r in res_s)
    same = sum(a.token_ids == b.token_ids for a, b in zip(res_b, res_s))
    return {
        "what": f"{len(prompts)} different prompts x {n_new} steered greedy tokens (add at block {layer}): one "
                f"generate call (left-padded batch) vs one call per prompt; order batched, sequential, batched",
        "prompts": len(prompts),
        "max_new_tokens": n_new,
        "warmup_seconds": {"one_sequential_prompt": t_one, "batched": t_b0},
        "seconds": {"batched_1": t_b1, "sequential": t_s, "batched_2": t_b2, "batched_mean": t_b},
        "tokens": {"batched": tok_b, "sequential": tok_s},
        "tokens_per_s": {"batched": tok_b / t_b, "sequential": tok_s / t_s},
        "ratio_sequential_over_batched_time": t_s / t_b,
        "ratio_batched_over_sequential_tok_s": (tok_b / t_b) / (tok_s / t_s),
        "rows_with_same_tokens_batched_and_sequential": f"{same}/{len(prompts)}",
        "reduced_from": n_prompts if n < n_prompts else None,
    }


def phase_sweep(lm: Any, vectors: Any, held: Any, budget: Budget, smoke: bool) -> dict[str, Any]:
    """The shipped sweep vs the naive per-configuration loop, shipped / naive / shipped."""
    from steerdesk.core.evaluate import TextScorer, prepare_texts
    from steerdesk.core.steering import Steer
    from steerdesk.core.sweep import sweep

    n_layers = lm.info.num_layers
    layers = list(range(n_layers))
    scales = [0.0, 1.0, 2.0] if smoke else SCALES
    max_pairs = 4 if smoke else None
    batch_size, max_rows = 16, 64
    directions = vectors.directions
    texts = prepare_texts(lm, held, max_pairs=max_pairs)

    # Warm-up + estimates: a small sweep, and one naive configuration.
    sweep(lm, vectors, held, layers=[layers[-1]], scales=[1.0], max_pairs=2)
    scorer = TextScorer(lm, texts, batch_size=batch_size, max_rows=max_rows)
    t_base, _ = timed(lm, scorer.baseline)
    t_cfg, _ = timed(lm, lambda: scorer.score([[Steer(layer=0, vector=directions[0], scale=1.0)]]))
    t_cfg = max(t_cfg, t_base)
    stride = 1
    while stride < n_layers and not budget.fits(
            # naive (baseline + configs) plus two shipped sweeps, each guessed at half the naive loop
            2.0 * (t_base + t_cfg * len(scales) * math.ceil(n_layers / stride))):
        stride += 1
    if stride > 1:
        layers = layers[::stride]
        log(f"sweep: every layer does not fit the phase ({budget.phase_left():.0f} s left): one layer in {stride}")
    kw = dict(layers=layers, scales=scales, max_pairs=max_pairs, batch_size=batch_size, max_rows=max_rows)

    def shipped() -> Any:
        return sweep(lm, vectors, held, **kw)

    def naive() -> tuple[list[list[float]], list[list[float]], dict[tuple[int, int], float]]:
        per_config: dict[tuple[int, int], float] = {}
        margin = [[0.0] * len(scales) for _ in layers]
        fluency = [[0.0] * len(scales) for _ in layers]
        sc = TextScorer(lm, texts, batch_size=batch_size, max_rows=max_rows)
        base = sc.baseline()
        for r, layer in enumerate(layers):
            for c, scale in enumerate(scales):
                tc = time.perf_counter()
                (s,) = sc.score([[Steer(layer=layer, vector=directions[layer], scale=scale)]])
                sync(lm)
                per_config[(r, c)] = time.perf_counter() - tc
                margin[r][c] = s.margin - base.margin
                fluency[r][c] = s.fluency - base.fluency
        return margin, fluency, per_config

    t_s1, res1 = timed(lm, shipped)
    log(f"sweep: shipped {len(layers)} x {len(scales)} in {t_s1:.2f} s (path {res1.path})")
    t_n, (n_margin, n_fluency, per_config) = timed(lm, naive)
    log(f"sweep: naive loop in {t_n:.2f} s")
    t_s2, res2 = (timed(lm, shipped) if budget.fits(t_s1) else (None, None))
    if t_s2 is not None:
        log(f"sweep: shipped again in {t_s2:.2f} s")
    t_ship = t_s1 if t_s2 is None else (t_s1 + t_s2) / 2
    t_zero = sum(v for (r, c), v in per_config.items() if scales[c] == 0)
    cells = [(r, c) for r in range(len(layers)) for c in range(len(scales))]
    diff = max(max(abs(res1.margin_delta[r][c] - n_margin[r][c]), abs(res1.fluency_delta[r][c] - n_fluency[r][c]))
               for r, c in cells)
    return {
        "what": f"{len(layers)} layers x scales {scales}, {len(texts.indices('base'))} held-out neutral_rude pairs, "
                f"batch {batch_size}, {max_rows} rows per forward: shipped sweep (mean of the runs before and after) "
                f"vs the naive loop (TextScorer.score one configuration at a time, baseline included)",
        "layers": layers,
        "scales": scales,
        "seconds": {"shipped_1": t_s1, "shipped_2": t_s2, "shipped_mean": t_ship, "naive": t_n,
                    "naive_scale0_configs": t_zero},
        "ratio_naive_over_shipped": t_n / t_ship,
        "ratio_excluding_scale0": (t_n - t_zero) / t_ship,
        "path": res1.path,
        "max_abs_difference_naive_vs_sweep": diff,
        "shipped_runs_equal": (res1.margin_delta == res2.margin_delta) if res2 is not None else None,
        "layer_stride": stride,
    }


def dataset_pairs(n_pairs: int) -> Any:
    """``neutral_rude`` cycled to ``n_pairs`` rows, each repeat with a distinct prompt suffix."""
    from steerdesk.core.datasets import Dataset, Example, load_bundled

    src = load_bundled("neutral_rude").examples
    rows = []
    for i in range(n_pairs):
        e = src[i % len(src)]
        rows.append(Example(e.prompt + PAIR_SUFFIXES[(i // len(src)) % len(PAIR_SUFFIXES)], e.base, e.target))
    return Dataset(rows, name=f"neutral_rude_x{n_pairs}")


def phase_extract(lm: Any, budget: Budget, smoke: bool) -> dict[str, Any]:
    """``compute_vectors`` on 1000 pairs at batch 8 (default) vs batch 32, alternating."""
    import torch

    from steerdesk.core.extract import compute_vectors, encode

    n_pairs = 32 if smoke else 1000
    ds = dataset_pairs(n_pairs)
    n_tokens = sum(len(e.ids) for e in encode(lm, list(ds.base_texts) + list(ds.target_texts)))
    sizes = (8, 32)
    compute_vectors(lm, dataset_pairs(min(n_pairs, 64)), batch_size=32)  # warm-up
    t_est, _ = timed(lm, lambda: compute_vectors(lm, dataset_pairs(min(n_pairs, 64)), batch_size=8))
    est = t_est * n_pairs / min(n_pairs, 64)
    secs: dict[int, list[float]] = {b: [] for b in sizes}
    dirs: dict[int, Any] = {}
    order = [8, 32, 32, 8]
    for i, b in enumerate(order):
        if i % 2 == 0 and not budget.fits(2 * est):
            log(f"extract: stopping after {i} runs ({budget.phase_left():.0f} s left, a pair of runs ~{2 * est:.0f} s)")
            break
        dt, vs = timed(lm, lambda b=b: compute_vectors(lm, ds, batch_size=b))
        secs[b].append(dt)
        dirs[b] = vs.directions.float()
        est = max(est, dt)
        log(f"extract: {n_pairs} pairs at batch {b} in {dt:.2f} s = {n_pairs / dt:.1f} pairs/s")
    cos = None
    if all(b in dirs for b in sizes):
        cos = float(torch.nn.functional.cosine_similarity(dirs[8], dirs[32], dim=-1).min())
    med = {b: statistics.median(v) if v else None for b, v in secs.items()}
    return {
        "what": f"compute_vectors (mean-diff, last token) on {n_pairs} pairs = {2 * n_pairs} texts, "
                f"{n_tokens} tokens; batch 8 (CLI/window default) vs batch 32, alternating 8,32,32,8",
        "pairs": n_pairs,
        "tokens": n_tokens,
        "seconds": {f"batch_{b}": v for b, v in secs.items()},
        "pairs_per_s": {f"batch_{b}": (n_pairs / m if m else None) for b, m in med.items()},
        "tokens_per_s": {f"batch_{b}": (n_tokens / m if m else None) for b, m in med.items()},
        "ratio_batch32_over_batch8_speed": median_ratio(secs[8], secs[32]),
        "min_cosine_batch8_vs_batch32": cos,
    }


# ============================================================================ main

def machine_info(device: str) -> dict[str, Any]:
    """Device, versions, CPU model and load of the machine."""
    import torch
    import transformers

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {
        "device": device,
        "gpu": gpu,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (0 when every phase ran)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU (float32), seconds")
    ap.add_argument("--make-assets", action="store_true", help="save the embedded tokenizer to bench/.gpu_assets")
    ap.add_argument("--assets", default=str(ASSETS), help="tokenizer folder (default bench/.gpu_assets)")
    ap.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    ap.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --smoke)")
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default smollm2-1.7b (smoke with --smoke)")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for all phases together (default 300)")
    ap.add_argument("--phases", default="gen,batch,sweep,extract")
    ap.add_argument("--json", default=None, help="also write the result here (default $OUT/bench_gpu.json)")
    args = ap.parse_args(argv)
    if args.make_assets:
        print(make_assets(Path(args.assets)))
        return 0
    device = args.device or ("cpu" if args.smoke else "cuda")
    dtype_name = args.dtype or ("float32" if args.smoke else "bfloat16")
    shape = args.shape or ("smoke" if args.smoke else "smollm2-1.7b")
    phases = [p for p in args.phases.split(",") if p]
    unknown = [p for p in phases if p not in PHASE_SHARES]
    if unknown:
        ap.error(f"unknown phase(s) {unknown}; choose from {list(PHASE_SHARES)}")
    out_path = args.json or (str(Path(os.environ["OUT"]) / "bench_gpu.json") if os.environ.get("OUT") else None)

    result: dict[str, Any] = {"benchmark": "bench_gpu (issue 11 item 5)",
                              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "smoke": args.smoke, "budget_s": args.budget, "phases": {}, "errors": {}}

    def write() -> None:
        result["elapsed_s"] = time.perf_counter() - t_start
        text = json.dumps(result, indent=1, default=str)
        if out_path:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(text + "\n")
        return None

    def on_term(signum: int, frame: Any) -> None:
        result["interrupted"] = f"signal {signum}"
        write()
        print(json.dumps(result, indent=1, default=str), flush=True)
        os._exit(3)

    t_start = time.perf_counter()
    signal.signal(signal.SIGTERM, on_term)
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here: use --smoke (CPU) or --device cpu")
    result["machine"] = machine_info(device)
    budget = Budget(args.budget, {p: PHASE_SHARES[p] for p in phases})

    t0 = time.perf_counter()
    tok, how = load_tokenizer(Path(args.assets))
    lm = build_model(shape, device, dtype_name, tok)
    sync(lm)
    n_params = sum(p.numel() for p in lm.model.parameters())
    result["model"] = {"shape": shape, **SHAPES[shape], "vocab_size": len(tok), "parameters": n_params,
                       "dtype": lm.info.dtype, "device": lm.info.device, "architecture": lm.info.architecture,
                       "attn_implementation": getattr(lm.model.config, "_attn_implementation", None),
                       "tokenizer": how, "build_seconds": time.perf_counter() - t0}
    log(f"{lm.info.architecture} {shape}: {n_params / 1e9:.2f} B parameters, {lm.info.dtype} on {lm.info.device} "
        f"(built in {time.perf_counter() - t0:.1f} s); tokenizer via {how}")

    from steerdesk.core.datasets import load_bundled
    from steerdesk.core.extract import compute_vectors

    train, held = load_bundled("neutral_rude").split(0.25)
    t0 = time.perf_counter()
    vectors = compute_vectors(lm, train, batch_size=16)
    sync(lm)
    result["setup_vectors_seconds"] = time.perf_counter() - t0
    log(f"vectors from {len(train)} neutral_rude pairs in {result['setup_vectors_seconds']:.1f} s")
    write()

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "gen": lambda: phase_gen(lm, vectors.directions, budget, args.smoke),
        "batch": lambda: phase_batch(lm, vectors.directions, budget, args.smoke),
        "sweep": lambda: phase_sweep(lm, vectors, held, budget, args.smoke),
        "extract": lambda: phase_extract(lm, budget, args.smoke),
    }
    for name in phases:
        left = budget.start(name)
        log(f"phase {name}: {left:.0f} s of {budget.left():.0f} s left")
        if left < 1.0:
            result["phases"][name] = {"skipped": "out of time"}
            continue
        t0 = time.perf_counter()
        try:
            result["phases"][name] = runners[name]()
        except Exception as exc:  # noqa: BLE001 - one broken phase must not lose the others' numbers
            result["errors"][name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            log(f"phase {name} FAILED: {result['errors'][name]}")
            traceback.print_exc()
        result.setdefault("phase_seconds", {})[name] = time.perf_counter() - t0
        if lm.input_device.type == "cuda":
            result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        write()

    p = result["phases"]
    result["summary"] = {
        "gen_steered_over_unsteered_tok_s": p.get("gen", {}).get("ratio_steered_over_unsteered_tok_s"),
        "gen_tok_s": p.get("gen", {}).get("median_tokens_per_s"),
        "batch32_sequential_over_batched_time": p.get("batch", {}).get("ratio_sequential_over_batched_time"),
        "sweep_naive_over_shipped": p.get("sweep", {}).get("ratio_naive_over_shipped"),
        "sweep_naive_over_shipped_excluding_scale0": p.get("sweep", {}).get("ratio_excluding_scale0"),
        "sweep_max_abs_difference": p.get("sweep", {}).get("max_abs_difference_naive_vs_sweep"),
        "extract_pairs_per_s": p.get("extract", {}).get("pairs_per_s"),
        "extract_batch32_over_batch8": p.get("extract", {}).get("ratio_batch32_over_batch8_speed"),
    }
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    write()
    print(json.dumps(result, indent=1, default=str), flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
