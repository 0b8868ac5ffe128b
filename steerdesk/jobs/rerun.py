"""Job: re-run a recorded run (a JSON recipe): record -> the job's Spec -> the same job's ``run``.

The recorded model is loaded (``load`` job) unless one is given, checked against the record, the
recorded inputs read back and checked by hash (:mod:`steerdesk.core.recipes`), and the job's Spec
rebuilt from the record; the job runs through ``steerdesk.jobs`` exactly as it did the first time
and records again. The outputs are compared with the recorded ones: tokens must be equal
(generate, versus, grid), the directions hash equal (compute), scores within 1e-4 (sweep, diagnose,
compare: every method's swept cells and best cell, and the prompt baseline).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..core.errors import SteerdeskError
from ..core.generate import SamplingSettings
from ..core.models import LoadedModel
from ..core.records import RunRecord
from .compute import ComputeSpec
from .context import JobContext
from .diagnose import DiagnoseSpec
from .generate import GenerateSpec
from .grid import GridSpec
from .method_compare import CompareSpec
from .steering_spec import SteeringSpec
from .sweep import SweepSpec
from .versus import VersusSpec

if TYPE_CHECKING:
    from ..core.condition import ConditionGate

JobSpec = GenerateSpec | ComputeSpec | SweepSpec | DiagnoseSpec | VersusSpec | GridSpec | CompareSpec
"""The Specs a record can be turned back into."""

NAME = "rerun"
TITLE = "Could not re-run the recipe"


@dataclass(frozen=True)
class RerunSpec:
    """Re-run ``recipe`` (with its ``model`` field, or ``lm`` when the job is given one).

    ``device`` defaults to the recorded one when that was the CPU, else ``auto``. Inputs that
    changed since the run are refused unless ``allow_changes``. ``output`` writes the recomputed
    vectors (compute) or the sweep result (sweep) there.
    """

    recipe: RunRecord = field(compare=False)
    device: str | None = None
    allow_changes: bool = False
    output: str | None = None


@dataclass
class Rerun:
    """What a re-run gave: a fresh record, whether the outputs match the recipe's, and how not.

    ``result`` is what the CLI shows: the rows' ``GenerationResult`` list (generate), the
    ``VectorSet`` (compute), the ``SweepResult`` (sweep), ``Diagnostics``, ``Versus``, the grid rows or
    the ``MethodComparison`` (compare).
    """

    record: RunRecord
    reproduced: bool
    differences: list[str]
    result: Any = None
    spec: JobSpec | None = None  # the job Spec the record was turned into


def _sampling(recipe: RunRecord) -> SamplingSettings:
    return SamplingSettings(**{k: v for k, v in (recipe.sampling or {}).items()
                               if k in ("max_new_tokens", "temperature", "top_p", "seed")})


def _steering(recipe: RunRecord, lm: LoadedModel, changes: list[str]) -> SteeringSpec | None:
    """The recipe's steering as a SteeringSpec (None when the recipe steers nothing)."""
    from ..core.recipes import vectors_of
    from .steering_spec import LayerSteer

    specs = recipe.settings.get("steers")
    if specs is None:  # a hand-written recipe: one setting for every layer
        specs = [{"layer": layer, "scale": scale, "mode": recipe.mode or "add", "normalize": recipe.normalize,
                  "positions": recipe.positions or "all"} for layer, scale in zip(recipe.layers, recipe.scales)]
    if not specs:
        return None
    vs, from_file, path = vectors_of(recipe, lm, changes)
    per_layer = tuple(LayerSteer(scale=float(s["scale"]), mode=str(s.get("mode", "add")),
                                 normalize=bool(s.get("normalize", False)), positions=str(s.get("positions", "all")))
                      for s in specs)
    return SteeringSpec(vectors=vs, layers=tuple(int(s["layer"]) for s in specs), vector_path=path,
                        per_layer=per_layer, identify=from_file)


def spec_for(recipe: RunRecord, lm: LoadedModel, changes: list[str], output: str | None = None) -> JobSpec:
    """The job Spec that runs ``recipe`` again on ``lm`` (inputs read back, changes noted)."""
    from ..core.recipes import dataset_of, vectors_of
    from . import compute, diagnose, generate, grid, sweep, versus

    kind, s, d = recipe.kind, recipe.settings, recipe.dataset or {}
    if kind == "generate":
        if not recipe.prompts:
            raise SteerdeskError("The recipe has no prompt.")
        steering = _steering(recipe, lm, changes)
        flags = recipe.steered_rows or [steering is not None] * len(recipe.prompts)
        return generate.GenerateSpec(prompts=tuple(recipe.prompts), steering=steering, steered_rows=tuple(flags),
                                     sampling=_sampling(recipe), system=recipe.system, model=recipe.model,
                                     gate=_gate(s))
    if kind == "versus":
        loaded, used = dataset_of(recipe, changes)
        steering = _steering(recipe, lm, changes)
        if steering is None or not recipe.prompts:
            raise SteerdeskError("The recipe has no steering or no prompt to compare.")
        return versus.VersusSpec(heldout=used, steering=steering, instruction=str(s.get("instruction", "")),
                                 prompt=recipe.prompts[0], sampling=_sampling(recipe), max_pairs=d.get("max_pairs"),
                                 source=loaded, dataset_spec=d.get("spec"),
                                 heldout_fraction=float(d.get("heldout") or 0.0), model=recipe.model)
    if kind == "compute":
        loaded, _ = dataset_of(recipe, changes)
        optimized = recipe.method == "optimized"
        if optimized:
            from ..core.optimize import OptimizeSettings
        return compute.ComputeSpec(dataset=loaded, method=recipe.method or "mean-diff",
                                   read=recipe.read_position or "last", batch_size=int(s.get("batch_size") or 8),
                                   system=recipe.system, heldout=float(d.get("heldout") or 0.0),
                                   seed=int(d.get("seed") or 0), dataset_spec=d.get("spec"), output=output,
                                   model=recipe.model,
                                   layers=tuple(recipe.layers) if optimized else None,
                                   optimize=OptimizeSettings(**s["optimize"]) if optimized and s.get("optimize")
                                   else None)
    if kind == "compare":
        return _compare_spec(recipe, lm, changes)
    if kind == "diagnose":
        loaded, used = dataset_of(recipe, changes)
        vs, _, path = vectors_of(recipe, lm, changes)
        return diagnose.DiagnoseSpec(vectors=vs, dataset=used, read=s.get("read"), system=recipe.system,
                                     batch_size=int(s.get("batch_size") or 8), source=loaded,
                                     dataset_spec=d.get("spec"), heldout_fraction=float(d.get("heldout") or 0.0),
                                     vector_path=path, model=recipe.model)
    if kind == "grid":
        vs, _, path = vectors_of(recipe, lm, changes)
        return grid.GridSpec(vectors=vs, layers=tuple(recipe.layers), scales=tuple(recipe.scales),
                             prompts=tuple(recipe.prompts), mode=recipe.mode or "add", normalize=recipe.normalize,
                             sampling=_sampling(recipe), pattern=s.get("pattern"), regex=bool(s.get("regex")),
                             batch_rows=int(s.get("batch_rows") or 16), vector_path=path, model=recipe.model,
                             positions=recipe.positions or "all", gate=_gate(s))
    loaded, used = dataset_of(recipe, changes)  # sweep
    vs, _, path = vectors_of(recipe, lm, changes)
    sets = s.get("sets") or None
    return sweep.SweepSpec(vectors=vs, heldout=used, layers=tuple(recipe.layers), scales=tuple(recipe.scales),
                           sets={k: tuple(v) for k, v in sets.items()} if sets else None,
                           mode=recipe.mode or "add", normalize=recipe.normalize,
                           positions=recipe.positions or "all", fluency_budget=float(s.get("fluency_budget", 0.5)),
                           neutral=tuple(s["neutral_texts"]) if s.get("neutral_texts") else None,
                           system=recipe.system, max_pairs=d.get("max_pairs"),
                           batch_size=int(s.get("batch_size") or 16), max_rows=int(s.get("max_rows") or 64),
                           prefix_reuse=bool(s.get("prefix_reuse", True)), vector_path=path, dataset=loaded,
                           dataset_spec=d.get("spec"), heldout_fraction=float(d.get("heldout") or 0.0),
                           model=recipe.model, gate=_gate(s))


def _compare_spec(recipe: RunRecord, lm: LoadedModel, changes: list[str]) -> CompareSpec:
    """The ``compare`` job's Spec of a record (the extra rows' embedded vectors read back)."""
    from ..core.method_compare import METHODS
    from ..core.optimize import OptimizeSettings
    from ..core.recipes import dataset_of, vectors_of
    from ..core.sweep_result import DEFAULT_BUDGET

    s, d = recipe.settings, recipe.dataset or {}
    loaded, _ = dataset_of(recipe, changes)
    extra = tuple((str(e.get("name", f"extra {i}")), vectors_of(replace(recipe, vector=e), lm, changes)[0])
                  for i, e in enumerate(s.get("extra") or []))
    return CompareSpec(dataset=loaded, layers=tuple(int(x) for x in recipe.layers),
                       scales=tuple(float(x) for x in recipe.scales), heldout=float(d.get("heldout") or 0.25),
                       seed=int(d.get("seed") or 0), budget=float(s.get("budget", DEFAULT_BUDGET)),
                       instruction=s.get("instruction"), extra=extra,
                       methods=tuple(METHODS if s.get("methods") is None else s["methods"]),  # [] stays []
                       optimize=OptimizeSettings(**s["optimize"]) if s.get("optimize") else None,
                       read=recipe.read_position or "last", batch_size=int(s.get("batch_size") or 8),
                       max_pairs=d.get("max_pairs"), dataset_spec=d.get("spec"), model=recipe.model)


def _gate(settings: dict[str, Any]) -> ConditionGate | None:
    """The ``ConditionGate`` of a record's ``settings["gate"]``, or None when it has none."""
    if settings.get("gate") is None:
        return None
    from ..core.record_kinds import gate_from_settings

    return gate_from_settings(settings["gate"])


def _load(recipe: RunRecord, device: str | None, ctx: JobContext) -> LoadedModel:
    from . import load

    if device is None:
        recorded = (recipe.device or "").split(":")[0]
        device = "cpu" if recorded == "cpu" else "auto"
    return load.run(None, load.LoadSpec(spec=recipe.model, device=device, dtype=recipe.dtype or "auto",
                                        quantize=recipe.quantization or "none"), ctx)


def run(lm: LoadedModel | None, spec: RerunSpec, ctx: JobContext) -> Rerun:
    """Re-run ``spec.recipe`` (loading its model when ``lm`` is None); see the module docstring.

    Raises ``SteerdeskError`` for a model of another shape, inputs that cannot be read, or inputs
    that changed since the run (unless ``allow_changes``).
    """
    from ..core.recipes import check_model, refuse_changes
    from . import job_for

    recipe = spec.recipe
    if spec.output:
        check_output(recipe, spec.output)
    changes: list[str] = []
    if lm is None:
        lm = _load(recipe, spec.device, ctx)
    check_model(recipe, lm, changes)
    job_spec = spec_for(recipe, lm, changes, spec.output)
    refuse_changes(changes, spec.allow_changes)
    job = job_for(job_spec)
    t0 = time.perf_counter()
    result = job.run(lm, job_spec, ctx)
    seconds = time.perf_counter() - t0
    if recipe.kind in ("diagnose", "versus", "grid", "compare"):
        record = job.record(lm, job_spec, result, seconds=seconds)
    else:
        record = job.record(lm, job_spec, result)
    shown = result.rows if recipe.kind == "generate" else result.vectors if recipe.kind == "compute" else result
    _write(recipe.kind, shown, spec.output)
    return Rerun(record, not (differences := compare(recipe, record)), changes + differences, shown, job_spec)


#: The file endings a re-run's output may have, per recipe kind (the kinds that write a file).
OUTPUT_ENDINGS = {"compute": (".safetensors", ".gguf"), "sweep": (".json",)}


def check_output(recipe: RunRecord, output: str) -> None:
    """Refuse, before the model loads, an output path the re-run of ``recipe`` cannot use.

    Raises ``SteerdeskError`` for a recipe kind that writes no file (only compute and sweep
    re-runs do), an ending that is not the kind's format, a missing or read-only folder, or a file
    the recipe reads (its dataset or vector file; see :func:`steerdesk.core.fileio.check_output_file`;
    the CLI also refuses the recipe file itself).
    """
    from ..core.fileio import check_output_file

    if recipe.kind not in OUTPUT_ENDINGS:
        raise SteerdeskError(f"A re-run of a {recipe.kind} recipe writes no file: an output path applies to "
                             f"compute recipes (vectors) and sweep recipes (the result JSON).")
    read = [d.get(key) for d in (recipe.dataset or {}, recipe.vector or {}) for key in ("spec", "path")]
    check_output_file(output, suffixes=OUTPUT_ENDINGS[recipe.kind], what="output file",
                      inputs=tuple(str(p) for p in read if isinstance(p, str)))


def _write(kind: str, shown: Any, output: str | None) -> None:
    if not output:
        return
    if kind == "compute":
        from ..core.vectors import export_gguf, save_vectors

        if str(output).lower().endswith(".gguf"):
            export_gguf(shown, output)
        else:
            save_vectors(shown, output)
    elif kind == "sweep":
        shown.save(output)


def compare(recipe: RunRecord, record: RunRecord) -> list[str]:
    """How the re-run's outputs differ from the recorded ones (empty: reproduced)."""
    from ..core.recipes import close

    old, new = recipe.outputs, record.outputs
    if recipe.kind == "generate":
        a = [r.get("token_ids") for r in old.get("rows", [])]
        b = [r["token_ids"] for r in new["rows"]]
        out = [f"row {i}: tokens differ from the record (first at token "
               f"{next((k for k, (x, y) in enumerate(zip(o, n)) if x != y), min(len(o), len(n)))})"
               for i, (o, n) in enumerate(zip(a, b)) if o != n]
        if len(a) != len(b):
            out.append(f"the record has {len(a)} output rows, the re-run {len(b)}")
        return out
    if recipe.kind == "compute":
        want = old.get("directions_sha256")
        same = want is None or new["directions_sha256"] == want
        return [] if same else ["the vectors differ from the recorded ones (directions hash)"]
    if recipe.kind == "sweep":
        out = [f"{key.replace('_', ' ')} differs from the record by more than 1e-4"
               for key in ("margin_delta", "fluency_delta") if not close(old.get(key), new.get(key), 1e-4)]
        if "gate" in old and (old["gate"] or {}).get("open") != (new.get("gate") or {}).get("open"):
            out.append("the gate opened for other prompts than in the record")
        return out
    if recipe.kind == "diagnose":
        was, now = old.get("diagnostics") or {}, new["diagnostics"]
        return [f"{key.replace('_', ' ')} differs from the record by more than 1e-4"
                for key in ("auc", "d_prime", "consistency", "alignment")
                if not close(was.get(key), now.get(key), 1e-4)]
    if recipe.kind == "compare":
        return _compare_differences(old.get("comparison") or {}, new["comparison"])
    if recipe.kind == "versus":
        a_c = (old.get("versus") or {}).get("conditions", [])
        b_c = new["versus"]["conditions"]
        out = [f"condition {c['name']}: tokens differ from the record" for c, o in zip(b_c, a_c)
               if c.get("token_ids") != o.get("token_ids")]
        out += [f"condition {c['name']}: scores differ from the record by more than 1e-4" for c, o in zip(b_c, a_c)
                if not close([c["margin_delta"], c["fluency_delta"]], [o.get("margin_delta"), o.get("fluency_delta")],
                             1e-4)]
        return out + ([f"the record has {len(a_c)} conditions, the re-run {len(b_c)}"] if len(a_c) != len(b_c) else [])
    a_r, b_r = old.get("rows", []), new["rows"]  # grid
    out = [f"grid row {i}: text differs from the record" for i, (o, n) in enumerate(zip(a_r, b_r))
           if o.get("text") != n.get("text") or ("token_ids" in o and o["token_ids"] != n.get("token_ids"))]
    return out + ([f"the record has {len(a_r)} rows, the re-run {len(b_r)}"] if len(a_r) != len(b_r) else [])


def _compare_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """How a re-run comparison differs from the recorded one: per method its swept cells and best cell
    (scores within 1e-4, the same layer and scale), and the prompt baseline's scores."""
    from ..core.recipes import close

    was = {m.get("method"): m for m in old.get("methods") or []}
    out = []
    for m in new["methods"]:
        o = was.get(m["method"])
        if o is None:
            out.append(f"{m['method']}: not in the record")
            continue
        if not all(close(o.get(k), m[k], 1e-4) for k in ("margin_delta", "fluency_delta", "best_margin",
                                                           "best_fluency")):
            out.append(f"{m['method']}: scores differ from the record by more than 1e-4")
        elif (o.get("best_layer"), o.get("best_scale")) != (m["best_layer"], m["best_scale"]):
            out.append(f"{m['method']}: the best cell differs from the record")
    if len(was) != len(new["methods"]):
        out.append(f"the record has {len(was)} methods, the re-run {len(new['methods'])}")
    p_old, p_new = old.get("prompt"), new.get("prompt")
    if p_old is None or p_new is None:
        same = p_old is None and p_new is None
    else:
        same = close([p_old.get("margin_delta"), p_old.get("fluency_delta")],
                     [p_new["margin_delta"], p_new["fluency_delta"]], 1e-4)
    if not same:
        out.append("the prompt baseline differs from the record by more than 1e-4")
    return out


def rerun(recipe: RunRecord, *, lm: LoadedModel | None = None, device: str | None = None,
          allow_changes: bool = False, output: str | None = None, ctx: JobContext | None = None) -> Rerun:
    """Convenience: :func:`run` with a :class:`RerunSpec` built from the arguments."""
    return run(lm, RerunSpec(recipe=recipe, device=device, allow_changes=allow_changes, output=output),
               ctx or JobContext())
