"""Conditional steering benchmark (issue 15): gated vs ungated generation, calibration vs a naive loop.

Workload: SmolLM2-135M-Instruct (float32, CPU, 1 torch thread), the bundled ``cooking`` condition set.

``generate``: 8 mixed held-out prompts (4 on-topic, 4 off-topic), greedy, ``--tokens`` new tokens,
steering = mean-diff ``neutral_rude`` vector (training part of a 75/25 split) at layer 15 x1.5.
Ungated (every row steered) and gated (condition vectors from the training prompts, last-token
read, the gate calibrated on the training prompts) alternate ``--repeats`` times; the ratio is
gated tokens/s over ungated tokens/s (tokens = decode steps x rows, the same for both), median.

``calibrate``: 64 held-out prompts, 30 layers x 50 thresholds x 2 sides: ``core.condition.calibrate``
(one forward pass per batch of 16 prompts, cut after the deepest layer, thresholds on the collected
scores) against the naive loop, one forward per (layer, threshold): the naive cost is measured on
``--naive-samples`` (layer, threshold) points spread over the layers (each a ``gate_scores`` call on
the 64 prompts, itself cut after its layer: a conservative naive) and multiplied by 1500.

Usage::

    nice .venv/bin/python bench/bench_conditional.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-samples", type=int, default=6)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import transformers

    from steerdesk.core.condition import (
        ConditionGate,
        calibrate,
        compute_condition_vectors,
        gate_scores,
        load_condition_set,
    )
    from steerdesk.core.datasets import load_bundled
    from steerdesk.core.extract import compute_vectors
    from steerdesk.core.generate import SamplingSettings, generate
    from steerdesk.core.models import load_model
    from steerdesk.core.steering import steers_for

    out: dict = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "load_avg_start": os.getloadavg(), "torch": torch.__version__,
                 "transformers": transformers.__version__, "python": platform.python_version()}
    lm = load_model(device="cpu", dtype="float32")
    cs = load_condition_set("cooking")
    train, held = cs.part("train"), cs.part("heldout")
    cond = compute_condition_vectors(lm, train.positives(), train.negatives(), read="last")
    cal_train = calibrate(lm, cond, train.prompts, train.labels)
    gate = ConditionGate(cal_train.layer, cond.directions[cal_train.layer], cal_train.threshold, cal_train.side,
                         "last")
    rude = compute_vectors(lm, load_bundled("neutral_rude").split(0.25)[0])
    steers = steers_for(rude.directions, [15], scale=1.5)
    prompts = [p for pair in zip(held.positives()[:4], held.negatives()[:4]) for p in pair]
    sampling = SamplingSettings(max_new_tokens=args.tokens)
    generate(lm, prompts[:2], steers, sampling=SamplingSettings(max_new_tokens=4))  # warm-up
    times: dict[str, list[float]] = {"ungated": [], "gated": []}
    steps: dict[str, int] = {}
    opened = None
    for _ in range(args.repeats):
        for name in ("ungated", "gated"):
            n_steps = [0]
            t0 = time.perf_counter()
            res = generate(lm, prompts, steers, sampling=sampling, gate=gate if name == "gated" else None,
                           on_step=lambda *a: n_steps.__setitem__(0, n_steps[0] + 1))
            times[name].append(time.perf_counter() - t0)
            steps[name] = n_steps[0]
            if name == "gated":
                opened = [r.gate_open for r in res]
    tps = {k: steps[k] * len(prompts) / statistics.median(v) for k, v in times.items()}
    out["generate"] = {"prompts": len(prompts), "tokens": args.tokens, "gate": gate.describe(), "opened": opened,
                       "seconds": times, "steps": steps, "tok_per_s": tps,
                       "ratio_gated_over_ungated": tps["gated"] / tps["ungated"]}
    print(json.dumps(out["generate"], indent=1))

    layers = list(range(lm.info.num_layers))
    t0 = time.perf_counter()
    cal = calibrate(lm, cond, held.prompts, held.labels, layers=layers, num_thresholds=50, batch_size=16)
    t_cal = time.perf_counter() - t0
    sample_layers = [round(i * (len(layers) - 1) / max(1, args.naive_samples - 1)) for i in range(args.naive_samples)]
    naive_times = []
    for layer in sample_layers:
        g = ConditionGate(layer, cond.directions[layer], 0.0, "above", "last")
        t0 = time.perf_counter()
        s = gate_scores(lm, held.prompts, g)
        g.opens(s)
        naive_times.append(time.perf_counter() - t0)
    per_point = statistics.mean(naive_times)
    naive_total = per_point * len(layers) * 50
    out["calibrate"] = {"prompts": len(held.prompts), "layers": len(layers), "thresholds": 50,
                        "seconds": t_cal, "best": cal.to_json() | {"per_layer": None},
                        "naive_sample_layers": sample_layers, "naive_seconds_per_point": naive_times,
                        "naive_extrapolated_seconds": naive_total, "speedup": naive_total / t_cal}
    out["load_avg_end"] = os.getloadavg()
    print(json.dumps(out["calibrate"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
