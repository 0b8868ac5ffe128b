"""One constructor per job kind: a finished run -> its :class:`~steerdesk.core.records.RunRecord`.

The jobs layer calls these (``steerdesk.jobs.<job>.record``); each fills the common header
(:meth:`RecordHeader.fields_for`) and the kind's payload (``outputs`` per the kind's ``*Outputs``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .datasets import Dataset
from .diagnostics import Diagnostics
from .errors import SteerdeskError
from .generate import GenerationResult, SamplingSettings
from .identity import directions_sha256, vector_identity
from .models import LoadedModel
from .records import (
    RecordHeader,
    RunRecord,
    dataset_fields,
    embed_vectors,
    sampling_fields,
    vector_fields,
    vector_metadata,
)
from .steering import Steer

if TYPE_CHECKING:
    from .condition import ConditionGate
    from .method_compare import MethodComparison
from .sweep_result import SweepResult
from .textgrid import GridRow
from .vectors import VectorSet
from .versus import Versus


def steer_fields(steers: Sequence[Steer], sampling: SamplingSettings) -> dict[str, Any]:
    """The record fields of a generation's steers (layers, scales, the first steer's mode /
    normalize / positions) and of its sampling settings."""
    first = steers[0] if steers else None
    return {
        "layers": [int(s.layer) for s in steers],
        "scales": [float(s.scale) for s in steers],
        "mode": first.mode if first else None,
        "normalize": bool(first.normalize) if first else False,
        "positions": first.positions if first else None,
        "sampling": sampling_fields(sampling),
        "seed": sampling.seed,
    }


def record_generation(
    lm: LoadedModel,
    prompts: Sequence[str],
    results: Sequence[GenerationResult],
    *,
    steers: Sequence[Steer] = (),
    steered_rows: Sequence[bool] | None = None,
    sampling: SamplingSettings | None = None,
    system: str | None = None,
    vector_path: str | None = None,
    vectors: VectorSet | None = None,
    model: str | None = None,
    seconds: float = 0.0,
    gate: ConditionGate | None = None,
) -> RunRecord:
    """Record a :func:`~steerdesk.core.generate.generate` call.

    ``gate`` (a conditional run) is recorded in ``settings["gate"]``: layer, threshold, side,
    read and its condition direction embedded exactly (:func:`gate_settings`); each output row
    then carries its ``gate_score`` and ``gate_open``.

    ``steers`` is the steering applied to the rows flagged in ``steered_rows`` (default: every
    row); the other rows are unsteered (a side-by-side comparison). ``results`` are the
    :class:`~steerdesk.core.generate.GenerationResult` of each row. The steered layers' vectors
    are embedded; ``vectors`` (when given) adds the set's identity. Raises ``SteerdeskError`` when
    prompts, results and flags do not line up.
    """
    sampling = sampling or SamplingSettings()
    steered = list(steered_rows) if steered_rows is not None else [bool(steers)] * len(prompts)
    if len(steered) != len(prompts) or len(results) != len(prompts):
        raise SteerdeskError("A generation record needs one result and one steered flag per prompt.")
    vec: dict[str, Any] | None = None
    if steers:
        vec = {"path": str(vector_path) if vector_path else None,
               "embedded": embed_vectors({s.layer: s.vector for s in steers})}
        if vectors is not None:
            vec.update({k: v for k, v in vector_identity(vectors, vector_path).items() if k != "path"})
    meta = vector_metadata(vectors) if vectors is not None else {}
    return RunRecord(
        **RecordHeader.fields_for(lm, "generate", model, round(seconds, 3)),
        prompts=list(prompts),
        steered_rows=steered,
        system=system,
        vector=vec,
        method=meta.get("method") if vectors is not None else None,
        read_position=meta.get("read_position") if vectors is not None else None,
        **steer_fields(steers, sampling),
        settings={"steers": [{"layer": int(s.layer), "scale": float(s.scale), "mode": s.mode,
                              "normalize": bool(s.normalize), "positions": s.positions} for s in steers],
                  **({"gate": gate_settings(gate)} if gate is not None else {})},
        outputs={"rows": [{"token_ids": list(r.token_ids), "text": r.text, "finish_reason": r.finish_reason,
                           **({"gate_score": r.gate_score, "gate_open": r.gate_open} if gate is not None else {})}
                          for r in results]},
    )


def gate_settings(gate: ConditionGate) -> dict[str, Any]:
    """A gate as JSON: ``layer``, ``threshold``, ``side``, ``read`` and ``direction`` (``[hidden]``
    floats, exact: :func:`~steerdesk.core.records.embed_vectors`)."""
    return {"layer": int(gate.layer), "threshold": float(gate.threshold), "side": gate.side, "read": gate.read,
            "direction": embed_vectors({gate.layer: gate.direction})[str(int(gate.layer))]}


def gate_from_settings(obj: Any) -> ConditionGate:
    """The :class:`~steerdesk.core.condition.ConditionGate` a record's ``settings["gate"]`` describes.

    Raises ``SteerdeskError`` for a malformed entry (missing keys, a direction that is not a list
    of numbers).
    """
    from .condition import ConditionGate

    try:
        return ConditionGate(layer=int(obj["layer"]), direction=torch.tensor([float(x) for x in obj["direction"]],
                                                                             dtype=torch.float32),
                             threshold=float(obj["threshold"]), side=str(obj.get("side", "above")),
                             read=str(obj.get("read", "mean")))
    except (KeyError, TypeError, ValueError):
        raise SteerdeskError("The recipe's gate needs layer, threshold and a direction of numbers.") from None


def record_compute(
    lm: LoadedModel,
    dataset: Dataset,
    vs: VectorSet,
    *,
    dataset_spec: str | None = None,
    heldout: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
    system: str | None = None,
    output: str | None = None,
    model: str | None = None,
    seconds: float = 0.0,
    trained_layers: Sequence[int] | None = None,
    optimize: dict[str, Any] | None = None,
) -> RunRecord:
    """Record a :func:`~steerdesk.core.extract.compute_vectors` call (or, with ``trained_layers`` and
    ``optimize`` -- the ``OptimizeSettings`` as a dict --, an ``optimized`` computation).

    ``dataset`` is the dataset as loaded; with ``heldout > 0`` the vectors came from the training
    part of ``dataset.split(heldout, seed)``.
    """
    meta = vector_metadata(vs)
    return RunRecord(
        **RecordHeader.fields_for(lm, "compute", model, round(seconds, 3)),
        system=system,
        dataset=dataset_fields(dataset, dataset_spec, heldout=heldout, seed=seed,
                               part="train" if heldout else "all"),
        method=meta.get("method"),
        read_position=meta.get("read_position"),
        layers=list(trained_layers) if trained_layers is not None else list(range(vs.num_layers)),
        settings={"batch_size": batch_size, "output": str(output) if output else None,
                  **({"optimize": optimize} if optimize is not None else {})},
        outputs={"directions_sha256": directions_sha256(vs.directions),
                 "relative_norm": [None if not math.isfinite(x) else x for x in vs.relative_strength().tolist()]},
    )


def record_sweep(
    lm: LoadedModel,
    result: SweepResult,
    dataset: Dataset,
    vectors: VectorSet | torch.Tensor,
    *,
    dataset_spec: str | None = None,
    heldout: float = 0.0,
    seed: int = 0,
    vector_path: str | None = None,
    model: str | None = None,
    gate: ConditionGate | None = None,
) -> RunRecord:
    """Record a :func:`~steerdesk.core.sweep.sweep` (``dataset`` as loaded, before the held-out split).

    Without a vector file the swept layers' vectors are embedded. ``positions`` (a named position
    or a token window) is the record's ``positions``; ``gate`` (a conditional sweep) is recorded in
    ``settings["gate"]`` (:func:`gate_settings`) and its per-prompt decisions in ``outputs["gate"]``.
    """
    s = result.settings
    used = sorted(set(result.layers) | {x for row in result.sets for x in row.layers})
    vec = dict(result.vector)
    if vector_path:
        vec["path"] = str(vector_path)
    elif not vec.get("path"):
        d = vectors.directions if isinstance(vectors, VectorSet) else vectors
        vec["embedded"] = embed_vectors({layer: d[layer] for layer in used})
    meta = vector_metadata(vectors)
    return RunRecord(
        **RecordHeader.fields_for(lm, "sweep", model, result.seconds),
        system=s.get("system"),
        dataset=dataset_fields(dataset, dataset_spec, heldout=heldout, seed=seed,
                               part="heldout" if heldout else "all", max_pairs=s.get("max_pairs")),
        vector=vec,
        method=meta.get("method"),
        read_position=meta.get("read_position"),
        layers=list(result.layers),
        scales=list(result.scales),
        mode=s.get("mode"),
        normalize=bool(s.get("normalize")),
        positions=s.get("positions"),
        settings={"sets": {row.name: row.layers for row in result.sets}, "fluency_budget": result.fluency_budget,
                  "batch_size": s.get("batch_size"), "max_rows": s.get("max_rows"),
                  "prefix_reuse": s.get("prefix_reuse"), "neutral_texts": s.get("neutral_texts"),
                  **({"gate": gate_settings(gate)} if gate is not None else {})},
        outputs={"margin_delta": result.margin_delta, "fluency_delta": result.fluency_delta, "kl": result.kl,
                 "sets": [{"name": r.name, "margin_delta": r.margin_delta, "fluency_delta": r.fluency_delta}
                          for r in result.sets],
                 "best": result.best, "baseline": result.baseline, "path": result.path,
                 **({"gate": result.gate} if result.gate is not None else {})},
    )


def record_diagnose(
    lm: LoadedModel,
    result: Diagnostics,
    dataset: Dataset,
    vectors: VectorSet,
    *,
    dataset_spec: str | None = None,
    heldout: float = 0.0,
    seed: int = 0,
    read: str | None = None,
    system: str | None = None,
    batch_size: int = 8,
    vector_path: str | None = None,
    model: str | None = None,
    seconds: float = 0.0,
) -> RunRecord:
    """Record a :func:`~steerdesk.core.diagnostics.diagnose` run (``dataset`` as loaded; with
    ``heldout > 0`` the held-out part of its split was read). Without a file the vectors are embedded."""
    meta = vector_metadata(vectors)
    return RunRecord(
        **RecordHeader.fields_for(lm, "diagnose", model, round(seconds, 3)),
        system=system,
        dataset=dataset_fields(dataset, dataset_spec, heldout=heldout, seed=seed,
                               part="heldout" if heldout else "all"),
        vector=vector_fields(vectors, vectors.layers_with_direction, vector_path),
        method=meta.get("method"),
        read_position=result.read_position,
        layers=list(result.layers),
        settings={"read": read, "batch_size": batch_size},
        outputs={"diagnostics": result.to_dict()},
    )


def record_versus(
    lm: LoadedModel,
    result: Versus,
    dataset: Dataset,
    steers: Sequence[Steer],
    *,
    vectors: VectorSet | None = None,
    dataset_spec: str | None = None,
    heldout: float = 0.0,
    seed: int = 0,
    sampling: SamplingSettings | None = None,
    max_pairs: int | None = 16,
    vector_path: str | None = None,
    model: str | None = None,
    seconds: float = 0.0,
) -> RunRecord:
    """Record a :func:`~steerdesk.core.versus.prompt_vs_vector` run: instruction, prompt, the steering
    (vectors embedded, plus the set's identity when given) and the four conditions' scores and texts."""
    sampling = sampling or SamplingSettings()
    vec: dict[str, Any] = {"path": str(vector_path) if vector_path else None,
                           "embedded": embed_vectors({s.layer: s.vector for s in steers})}
    if vectors is not None:
        vec.update({k: v for k, v in vector_identity(vectors, vector_path).items() if k != "path"})
    return RunRecord(
        **RecordHeader.fields_for(lm, "versus", model, round(seconds, 3)),
        prompts=[result.prompt],
        dataset=dataset_fields(dataset, dataset_spec, heldout=heldout, seed=seed,
                               part="heldout" if heldout else "all", max_pairs=max_pairs),
        vector=vec,
        **steer_fields(steers, sampling),
        settings={"instruction": result.instruction},
        outputs={"versus": result.to_dict()},
    )


def record_grid(
    lm: LoadedModel,
    rows: Sequence[GridRow],
    vectors: VectorSet,
    layers: Sequence[int],
    scales: Sequence[float],
    prompts: Sequence[str],
    *,
    mode: str = "add",
    normalize: bool = False,
    sampling: SamplingSettings | None = None,
    pattern: str | None = None,
    regex: bool = False,
    batch_rows: int = 16,
    vector_path: str | None = None,
    model: str | None = None,
    seconds: float = 0.0,
    positions: str = "all",
    gate: ConditionGate | None = None,
) -> RunRecord:
    """Record a :func:`~steerdesk.core.textgrid.generation_grid` run (rows in grid order).

    ``positions`` (a named position or a token window) is the record's ``positions``; ``gate`` is
    recorded in ``settings["gate"]`` (:func:`gate_settings`), each row's decision in its output row.
    """
    from dataclasses import asdict

    sampling = sampling or SamplingSettings()
    meta = vector_metadata(vectors)
    return RunRecord(
        **RecordHeader.fields_for(lm, "grid", model, round(seconds, 3)),
        prompts=list(prompts),
        vector=vector_fields(vectors, sorted(set(layers)), vector_path),
        method=meta.get("method"),
        read_position=meta.get("read_position"),
        layers=[int(x) for x in layers],
        scales=[float(x) for x in scales],
        mode=mode,
        normalize=normalize,
        positions=positions,
        sampling=sampling_fields(sampling),
        seed=sampling.seed,
        settings={"pattern": pattern, "regex": regex, "batch_rows": batch_rows,
                  **({"gate": gate_settings(gate)} if gate is not None else {})},
        outputs={"rows": [asdict(r) for r in rows]},
    )


def record_compare(
    lm: LoadedModel,
    result: MethodComparison,
    dataset: Dataset,
    *,
    dataset_spec: str | None = None,
    heldout: float = 0.25,
    seed: int = 0,
    methods: Sequence[str] = (),
    instruction: str | None = None,
    optimize: dict[str, Any] | None = None,
    read: str = "last",
    batch_size: int = 8,
    max_pairs: int | None = None,
    extra: Sequence[tuple[str, VectorSet]] = (),
    model: str | None = None,
    seconds: float = 0.0,
) -> RunRecord:
    """Record a :func:`~steerdesk.core.method_compare.compare_methods` run of the ``compare`` job.

    ``dataset`` is the dataset as loaded: the run split it with ``dataset.split(heldout, seed)``
    (training part: the vectors; held-out part: the sweeps). ``optimize`` is the optimized method's
    ``OptimizeSettings`` as a dict (the effective one, so a later change of defaults does not
    change the re-run); ``extra`` rows (name, set) have their compared layers' vectors embedded.
    ``outputs["comparison"]`` is :meth:`MethodComparison.to_dict`.
    """
    return RunRecord(
        **RecordHeader.fields_for(lm, "compare", model, round(seconds, 3)),
        dataset=dataset_fields(dataset, dataset_spec, heldout=heldout, seed=seed, part="all", max_pairs=max_pairs),
        read_position=read,
        layers=[int(x) for x in result.layers],
        scales=[float(x) for x in result.scales],
        mode="add",
        positions="all",
        settings={"methods": list(methods), "budget": float(result.budget), "instruction": instruction,
                  "optimize": optimize, "batch_size": batch_size,
                  "extra": [{"name": name, **vector_fields(vs, result.layers, None)} for name, vs in extra]},
        outputs={"comparison": result.to_dict()},
    )


__all__ = ["record_compare", "record_compute", "record_diagnose", "record_generation", "record_grid", "record_sweep",
           "record_versus"]
