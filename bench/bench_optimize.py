"""Optimised vectors (issue 17): training time, and held-out margin at the fluency budget vs mean-diff.

Two measurements on SmolLM2-135M-Instruct (CPU, float32 unless told otherwise):

* ``time``: ``optimize_vectors`` on the first ``--pairs`` (64) pairs of ``neutral_rude``, one layer,
  default settings unless overridden: wall time, epochs run, per-epoch curves, and where the time
  goes (mean-difference seed, reference forwards, path check, validation passes, training steps;
  the steps' neutral-KL forwards separately). Target (issue): at most 3 minutes on a 2-core CPU.
  ``--paths prefix,hooks`` trains once per path in one process (alternating with ``--repeat``),
  so the prefix cache's speed-up is measured under the same load; the vectors are compared.
* ``compare``: per bundled set, ``Dataset.split(0.25)`` (seed 0): the training part gives the
  mean-difference vectors and the optimised vector of ``--layer``; both are swept on the held-out
  part (``core.sweep``, layer ``--layer`` x ``--scales``, add, all positions) and the best margin
  delta with a fluency loss of at most ``--budget`` (0.5 nats/token) is reported for each, with
  the ratio optimised / mean-diff (acceptance: >= 1.5 on at least two of the three sets). Now
  ``core.method_compare.compare_methods``: mean-diff, PCA and optimized over the same ``--layers`` x
  ``--scales``, and the prompt baseline (``INSTRUCTIONS``, as system message).

Usage::

    .venv/bin/python bench/bench_optimize.py time --threads 1
    .venv/bin/python bench/bench_optimize.py time --threads 2 --paths prefix,hooks
    .venv/bin/python bench/bench_optimize.py compare --threads 1 --sets neutral_rude --layers 12,15 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETS = ("neutral_rude", "formal_casual", "assistant_golden_retriever")
SCALES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


#: The prompt baseline's instruction per bundled set (the system message, no vector).
INSTRUCTIONS = {"neutral_rude": "Reply rudely.",
                "formal_casual": "Reply casually, like a friend texting.",
                "assistant_golden_retriever": "Reply as an excited golden retriever dog."}


def _settings(args: argparse.Namespace) -> Any:
    from steerdesk.core.optimize import OptimizeSettings

    d = OptimizeSettings()
    return OptimizeSettings(epochs=args.epochs or d.epochs, batch_size=args.batch_size or d.batch_size,
                            lr=args.lr or d.lr, seed=args.seed,
                            kl_weight=d.kl_weight if args.kl_weight is None else args.kl_weight,
                            beta=args.beta or d.beta, reply_logprob=args.reply_logprob or d.reply_logprob,
                            patience=args.patience or d.patience)


def _train(lm: Any, ds: Any, layer: int, settings: Any, prefix_cache: bool = True) -> tuple[Any, float]:
    from steerdesk.core.optimize import optimize_vectors

    t0 = time.perf_counter()
    vs = optimize_vectors(lm, ds, [layer], settings=settings, prefix_cache=prefix_cache,
                          on_epoch=lambda r: log(f"layer {r.layer} epoch {r.epoch}: train {r.train_loss}, "
                                                 f"val {r.val_loss:.4f} ({time.perf_counter() - t0:.0f} s)"))
    return vs, time.perf_counter() - t0


class _Phases:
    """Wall time per phase of one ``optimize_vectors`` call, by wrapping its parts (seconds)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._undo: list[Any] = []

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        real = getattr(owner, name)

        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t
        setattr(owner, name, timed)
        self._undo.append((owner, name, real))

    def __enter__(self) -> _Phases:
        import steerdesk.core.optimize as opt
        import steerdesk.core.optimize_steps as steps

        self.wrap(opt, "compute_vectors", "mean-difference seed")
        self.wrap(steps.StepScorer, "__init__", "reference forwards (and recording)")
        self.wrap(steps.StepScorer, "prepare", "path choice and self-check")
        self.wrap(opt._Trainer, "full_loss", "validation passes")
        self.wrap(steps.StepScorer, "neutral_logp", "neutral log-probs (forward only; also inside validation)")
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, real in reversed(self._undo):
            setattr(owner, name, real)


def run_time(lm: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from steerdesk.core.datasets import Dataset, load_bundled

    full = load_bundled("neutral_rude")
    ds = Dataset(full.examples[:args.pairs], name=f"neutral_rude[:{args.pairs}]")
    runs: list[dict[str, Any]] = []
    vectors: dict[str, Any] = {}
    for rep in range(args.repeat):
        for path in args.paths.split(","):
            log(f"run {rep + 1}/{args.repeat}, path {path}; load {os.getloadavg()}")
            load_before = os.getloadavg()
            with _Phases() as phases:
                vs, seconds = _train(lm, ds, args.layers[0], _settings(args), prefix_cache=path == "prefix")
            meta = json.loads(vs.metadata["optimize"])
            curve = meta["curves"][str(args.layers[0])]
            epochs = len(curve["train"])
            phase = {k: round(v, 1) for k, v in phases.seconds.items()}
            phase["training steps (incl. their neutral forwards)"] = round(
                seconds - sum(v for k, v in phases.seconds.items() if not k.startswith("neutral")), 1)
            runs.append({"path": path, "ran": curve["path"], "seconds": round(seconds, 1), "epochs": epochs,
                         "stopped": curve["stopped"], "best_epoch": curve["best_epoch"], "phases": phase,
                         "load_average_before": load_before, "load_average_after": os.getloadavg(),
                         "curves": curve})
            log(f"path {path} ({curve['path']}): {seconds:.1f} s, {epochs} epochs, phases {phase}")
            vectors.setdefault(path, vs.directions[args.layers[0]])
    out: dict[str, Any] = {"pairs": len(ds), "layer": args.layers[0], "settings": meta["settings"], "runs": runs}
    if "prefix" in vectors and "hooks" in vectors:
        a, b = vectors["prefix"], vectors["hooks"]
        out["vector_relative_difference"] = float((a - b).norm() / b.norm())
        mean = lambda p: sum(r["seconds"] for r in runs if r["path"] == p) / sum(r["path"] == p for r in runs)
        out["speedup_prefix_vs_hooks"] = round(mean("hooks") / mean("prefix"), 3)
    out["torch"] = torch.__version__
    return out


def run_compare(lm: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Per set: ``core.method_compare.compare_methods`` (the same computation as ``steerdesk inspect
    --compare`` and the Analysis dock), every method over the same layers x scales."""
    from steerdesk.core.datasets import load_bundled
    from steerdesk.core.method_compare import compare_methods

    out: dict[str, Any] = {}
    for name in args.sets.split(","):
        train, held = load_bundled(name).split(0.25)
        log(f"{name}: {len(train)} training pairs, {len(held)} held out; load {os.getloadavg()}")
        t0 = time.perf_counter()
        cmp = compare_methods(lm, train, held, layers=args.layers, scales=args.scales, budget=args.budget,
                              instruction=INSTRUCTIONS.get(name), methods=args.methods.split(","),
                              optimize=_settings(args),
                              on_epoch=lambda r: log(f"{name} layer {r.layer} epoch {r.epoch}: train "
                                                     f"{r.train_loss}, val {r.val_loss:.4f} "
                                                     f"({time.perf_counter() - t0:.0f} s)"),
                              progress=lambda d, t: log(f"{name}: stage {d}/{t} ({time.perf_counter() - t0:.0f} s)"))
        log("\n" + cmp.format_table())
        row = cmp.to_dict()
        row["seconds"] = round(time.perf_counter() - t0, 1)
        row["load_average_after"] = os.getloadavg()
        out[name] = row
        if args.json:
            Path(args.json).write_text(json.dumps({"partial": out}, indent=1))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["time", "compare"])
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=[15],
                    help="layers compared (each method swept over all; 'time' trains the first)")
    ap.add_argument("--methods", default="mean-diff,pca,optimized")
    ap.add_argument("--pairs", type=int, default=64, help="pairs trained on ('time')")
    ap.add_argument("--paths", default="prefix", help="'time': training paths, comma-separated: prefix (the "
                    "prefix cache, default), hooks (full forwards through the hook, the old path)")
    ap.add_argument("--repeat", type=int, default=1, help="'time': passes over --paths (alternating)")
    ap.add_argument("--sets", default=",".join(SETS), help="bundled sets ('compare'), comma-separated")
    ap.add_argument("--scales", type=lambda s: [float(x) for x in s.split(",")], default=list(SCALES))
    ap.add_argument("--budget", type=float, default=0.5, help="fluency budget, nats/token")
    ap.add_argument("--epochs", type=int, default=0, help="0: the default")
    ap.add_argument("--batch-size", type=int, default=0, help="0: the default")
    ap.add_argument("--lr", type=float, default=0.0, help="0: the default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kl-weight", type=float, default=None, help="None: the default")
    ap.add_argument("--beta", type=float, default=0.0, help="0: the default")
    ap.add_argument("--patience", type=int, default=0, help="0: the default")
    ap.add_argument("--reply-logprob", choices=["sum", "mean"], default=None)
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args()

    import torch

    from steerdesk.core.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(device="cpu", dtype="float32")
    result = {"what": args.what, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
              "result": run_time(lm, args) if args.what == "time" else run_compare(lm, args)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
