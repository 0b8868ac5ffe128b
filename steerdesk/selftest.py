"""``steerdesk --self-test``: a headless check that this install (package or frozen binary) works.

It runs the same jobs as the window and the CLI (``steerdesk.jobs``: load, compute, generate): it
loads the embedded model, computes a steering vector on a small slice of a bundled dataset,
generates a few greedy tokens unsteered and steered in one batch, and checks that steering
changed them. Then a 3-trial search (``jobs.search``: Optuna in a SQLite study in a temporary
folder, layers 13-15, add) checks that the study stored 3 trials, that Optuna itself reads them
back from the file, and that the Pareto export (JSON and CSV) reads back with the same trials.
One line per step (``ok  load model (3.1 s)``); exit code 0, or 1 with the
failing step named (``FAIL compute vector: ...`` and a last line ``self-test FAILED at ...``).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

DATASET = "neutral_rude"
PAIRS = 16
LAYER = 14
SCALE = 1.0
TOKENS = 12
PROMPT = "What should I cook for dinner tonight?"
SEARCH_TRIALS = 3
SEARCH_PAIRS = 4  # held-out pairs: the bundled pairs after the PAIRS the vector is computed from
SEARCH_SPACE = f"layers={LAYER - 1}-{LAYER + 1};span=1;scale=0.5..1.5;modes=add;normalize=no"
SEARCH_NEUTRAL = ("The capital of France is Paris.", "Water boils at 100 degrees Celsius at sea level.")


class StepFailed(Exception):
    """A check inside a step did not hold (as opposed to an unexpected exception)."""


@dataclass
class SelfTest:
    """The self-test's state; each ``step_*`` method is one printed line."""

    model: str = "default"
    device: str = "auto"
    lm: Any = None
    qt: bool = True
    out: TextIO = field(default_factory=lambda: sys.stdout)
    debug: bool = False
    dataset: Any = None
    vectors: Any = None
    results: Any = None
    search: Any = None  # the self-test search's SearchResult

    # ------------------------------------------------------------------ steps

    def step_qt(self) -> str:
        """The Qt platform plugin, QtSvg and the packaged icon (what the window needs to start)."""
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
        from PySide6.QtCore import Qt
        from PySide6.QtGui import QImage, QPainter
        from PySide6.QtSvg import QSvgRenderer
        from PySide6.QtWidgets import QApplication

        from .ui.resources import icon_path

        app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "steerdesk"])
        renderer = QSvgRenderer(str(icon_path()))
        if not renderer.isValid():
            raise StepFailed(f"cannot read the icon {icon_path()}")
        image = QImage(64, 64, QImage.Format.Format_ARGB32)
        image.fill(Qt.GlobalColor.transparent)
        painter = QPainter(image)
        renderer.render(painter)
        painter.end()
        if image.pixelColor(32, 32).alpha() == 0 and image.pixelColor(20, 20).alpha() == 0:
            raise StepFailed("the icon rendered empty")
        return f"platform {app.platformName()}"

    def step_load_model(self) -> str:
        if self.lm is None:
            from . import jobs

            def say(done: int, total: int, msg: str) -> None:
                if total == 0:  # the load's messages; its counted steps are for the window's progress bar
                    print(f"     {msg}", file=sys.stderr, flush=True)

            self.lm = jobs.load.run(None, jobs.LoadSpec(spec=self.model, device=self.device),
                                    jobs.JobContext(on_progress=say))
        info = self.lm.info
        if info.num_layers <= LAYER:
            raise StepFailed(f"{info.name} has {info.num_layers} layers; the self-test steers layer {LAYER}")
        return f"{info.name}, {info.num_layers} layers, {info.device} {info.dtype}"

    def step_load_dataset(self) -> str:
        from .core.datasets import Dataset, load_bundled

        full = load_bundled(DATASET)
        if len(full) < PAIRS:
            raise StepFailed(f"bundled dataset {DATASET} has only {len(full)} pairs")
        self.dataset = Dataset(examples=full.examples[:PAIRS], name=DATASET, paired=full.paired)
        self.dataset.validate()
        return f"{DATASET}, {PAIRS} of {len(full)} pairs"

    def step_compute_vector(self) -> str:
        import torch

        from . import jobs

        spec = jobs.ComputeSpec(dataset=self.dataset, method="mean-diff", read="last", batch_size=8)
        vs = jobs.compute.run(self.lm, spec, jobs.JobContext()).vectors
        info = self.lm.info
        shape = tuple(vs.directions.shape)
        if shape != (info.num_layers, info.hidden_size):
            raise StepFailed(f"vector shape {shape}, expected {(info.num_layers, info.hidden_size)}")
        if not bool(torch.isfinite(vs.directions).all()):
            raise StepFailed("the vector has NaN or infinite values")
        norm = float(vs.directions[LAYER].norm())
        if norm == 0.0:
            raise StepFailed(f"the vector at layer {LAYER} is zero")
        self.vectors = vs
        return f"|v| at layer {LAYER} = {norm:.2f}"

    def step_generate(self) -> str:
        from . import jobs
        from .core.generate import SamplingSettings

        steering = jobs.SteeringSpec(vectors=self.vectors, layers=(LAYER,), scale=SCALE, mode="add")
        spec = jobs.GenerateSpec.single(PROMPT, steering, compare=True,
                                        sampling=SamplingSettings(max_new_tokens=TOKENS, temperature=0.0))
        self.results = jobs.generate.run(self.lm, spec, jobs.JobContext()).rows
        if len(self.results) != 2:
            raise StepFailed(f"expected 2 rows, got {len(self.results)}")
        for name, r in zip(("unsteered", "steered"), self.results):
            if not r.token_ids:
                raise StepFailed(f"the {name} row generated no tokens")
        return f"{len(self.results[0].token_ids)}+{len(self.results[1].token_ids)} tokens, greedy"

    def step_steering_changes_output(self) -> str:
        plain, steered = self.results
        if plain.token_ids == steered.token_ids:
            raise StepFailed(f"steered text equals unsteered text: {steered.text!r}")
        return f"unsteered {_short(plain.text)} / steered {_short(steered.text)}"

    def step_search(self) -> str:
        """A 3-trial search in a SQLite study (temporary folder): stored trials, Optuna's own read, exports."""
        import csv
        import json
        import tempfile
        from pathlib import Path

        import optuna

        from . import jobs
        from .core.datasets import Dataset, load_bundled
        from .core.search import STUDY_NAME, SearchSpace, close_study, load_result

        full = load_bundled(DATASET)
        held = Dataset(examples=full.examples[PAIRS:PAIRS + SEARCH_PAIRS], name=DATASET, paired=full.paired)
        if len(held) < SEARCH_PAIRS:
            raise StepFailed(f"bundled dataset {DATASET} has no {SEARCH_PAIRS} pairs after the first {PAIRS}")
        space = SearchSpace.parse(SEARCH_SPACE, SearchSpace.default(self.vectors, self.lm.info.num_layers))
        with tempfile.TemporaryDirectory(prefix="steerdesk-selftest-") as tmp:
            study = Path(tmp) / "study.db"
            spec = jobs.SearchSpec(vectors=self.vectors, heldout=held, study=str(study), trials=SEARCH_TRIALS,
                                   batch=SEARCH_TRIALS, space=space, seed=0, neutral=SEARCH_NEUTRAL)
            self.search = jobs.search.run(self.lm, spec, jobs.JobContext())
            stored = load_result(study)
            if len(stored.evaluated) != SEARCH_TRIALS:
                raise StepFailed(f"the study stored {len(stored.evaluated)} evaluated trials, "
                                 f"expected {SEARCH_TRIALS}")
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            opened = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{study}")
            complete = [t for t in opened.trials if t.state == optuna.trial.TrialState.COMPLETE]
            close_study(opened)  # release the file before the folder goes
            if len(complete) != SEARCH_TRIALS:
                raise StepFailed(f"Optuna reads {len(complete)} complete trials from the study file, "
                                 f"expected {SEARCH_TRIALS}")
            pareto = [t.number for t in stored.pareto]
            if not pareto:
                raise StepFailed("the study has no Pareto front")
            stored.save_json(Path(tmp) / "pareto.json")
            stored.save_csv(Path(tmp) / "pareto.csv")
            from_json = [t["number"] for t in json.loads((Path(tmp) / "pareto.json").read_text("utf-8"))["pareto"]]
            with open(Path(tmp) / "pareto.csv", newline="", encoding="utf-8") as fh:
                from_csv = [int(row["trial"]) for row in csv.DictReader(fh)]
            if from_json != pareto or from_csv != pareto:
                raise StepFailed(f"the Pareto export reads back as trials {from_json} (JSON) / {from_csv} (CSV), "
                                 f"the study has {pareto}")
        best = stored.best
        where = f"; best {best.settings.label()} margin {best.margin_delta:+.3f}" if best and best.settings else ""
        return (f"{SEARCH_TRIALS} trials stored in SQLite, Pareto front of {len(pareto)} read back "
                f"from JSON and CSV{where}; {self._refine_check(stored)}")

    def _refine_check(self, stored: Any) -> str:
        """The refine phase's Gaussian process (Optuna's GPSampler, scipy) proposes inside its region."""
        from .core.search_refine import centre_of, edge_factor, propose, region

        centre = centre_of(stored.trials, stored.fluency_budget)
        if centre is None or centre.fluency_delta is None:
            raise StepFailed("the refine phase found no trial with finite scores to centre on")
        proposals = propose(stored.trials, stored.space, stored.fluency_budget, 2, seed=0)
        searched, fixed = region(stored.space, centre.params, edge_factor(centre.fluency_delta, stored.fluency_budget))
        for params, _centre in proposals:
            if any(params.get(k) != v for k, v in fixed.items()) or not all(
                    d.low <= params[k] <= d.high for k, d in searched.items()):
                raise StepFailed(f"the refine phase proposed {params} outside its region around trial {centre.number}")
        if len(proposals) != 2:
            raise StepFailed(f"the refine phase proposed {len(proposals)} trials, expected 2")
        return "refine phase proposed 2 trials in its region"

    # ------------------------------------------------------------------ running

    def steps(self) -> list[tuple[str, Callable[[], str]]]:
        steps = [("qt offscreen", self.step_qt)] if self.qt else []
        return steps + [
            ("load model", self.step_load_model),
            ("load dataset", self.step_load_dataset),
            ("compute vector", self.step_compute_vector),
            ("generate", self.step_generate),
            ("steering changes output", self.step_steering_changes_output),
            ("search", self.step_search),
        ]

    def run(self) -> int:
        total = time.perf_counter()
        for name, fn in self.steps():
            t0 = time.perf_counter()
            try:
                detail = fn()
            except Exception as exc:  # noqa: BLE001 - every failure is reported as the step's
                seconds = time.perf_counter() - t0
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                kind = "" if isinstance(exc, StepFailed) else f"{type(exc).__name__}: "
                self._print(f"FAIL {name} ({seconds:.1f} s): {kind}{message}")
                if self.debug:
                    traceback.print_exc(file=self.out)
                self._print(f"self-test FAILED at '{name}'")
                return 1
            seconds = time.perf_counter() - t0
            self._print(f"ok   {name} ({seconds:.1f} s){': ' + detail if detail else ''}")
        self._print(f"self-test passed in {time.perf_counter() - total:.1f} s")
        return 0

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)


def _short(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def run_self_test(lm: Any = None, *, model: str = "default", device: str = "auto", qt: bool = True,
                  out: TextIO | None = None, debug: bool = False) -> int:
    """Run every step; 0 when all pass, 1 at the first failing step (which is named)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded model is local: never reach a hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return SelfTest(model=model, device=device, lm=lm, qt=qt, out=out or sys.stdout, debug=debug).run()


def main(argv: list[str]) -> int:
    """``steerdesk --self-test [--no-qt] [--model M] [--device D] [--debug]``."""
    import argparse

    p = argparse.ArgumentParser(prog="steerdesk --self-test",
                                description="Headless check of this steerdesk install.")
    p.add_argument("--self-test", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="default", help="model to test (default: the embedded SmolLM2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-qt", action="store_true", help="skip the Qt offscreen check")
    p.add_argument("--debug", action="store_true", help="print the traceback of a failing step")
    args = p.parse_args(argv)
    return run_self_test(model=args.model, device=args.device, qt=not args.no_qt, debug=args.debug)
