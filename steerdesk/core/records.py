"""Run records: what was run, on what, with which settings, and what came out; JSON recipes to re-run.

Every generation, vector computation and sweep can be described by a :class:`RunRecord`. A record
exported as JSON is a **recipe**: :func:`rerun` executes it again and says whether the outputs
match. A greedy generation on the same model, dtype and device reproduces its tokens exactly.

A recipe is self-contained where that is cheap: the steering vectors of a generation are
embedded (the layers used, float32 values written exactly), and so is a dataset that was never
saved to a file. Vector files and dataset files are referenced by path and checked by hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .datasets import Dataset, Example
from .errors import SteerdeskError

log = logging.getLogger(__name__)

FORMAT = "steerdesk.recipe/1"
KINDS = ("generate", "compute", "sweep")


@dataclass
class RunRecord:
    """One run. Fields that do not apply to a kind stay empty (``None`` / ``[]``).

    For ``generate``, ``layers[i]`` is steered at ``scales[i]``; for ``sweep``, ``layers`` and
    ``scales`` are the grid's axes.
    """

    kind: str
    model: str  # what to load again: "default", a Hugging Face id, a folder or a .gguf file
    model_name: str = ""
    model_revision: str | None = None
    architecture: str = ""
    num_layers: int = 0
    hidden_size: int = 0
    dtype: str = ""
    device: str = ""
    chat_template_sha256: str | None = None
    steerdesk_version: str = ""
    created: str = ""
    seconds: float = 0.0
    # inputs
    prompts: list[str] = field(default_factory=list)
    steered_rows: list[bool] = field(default_factory=list)  # generate: which prompt rows are steered
    system: str | None = None
    dataset: dict[str, Any] | None = None  # spec/name/sha256/heldout/seed/max_pairs (+ rows if unsaved)
    vector: dict[str, Any] | None = None  # path/directions_sha256/... (+ embedded layers)
    # settings
    method: str | None = None
    read_position: str | None = None
    layers: list[int] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    mode: str | None = None
    normalize: bool = False
    positions: str | None = None
    sampling: dict[str, Any] | None = None  # max_new_tokens, temperature, top_p, seed
    seed: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # kind-specific extras
    # outputs
    outputs: dict[str, Any] = field(default_factory=dict)

    # -- presentation ------------------------------------------------------------------
    @property
    def title(self) -> str:
        """A one-line summary for a history list."""
        if self.kind == "generate":
            steer = ", ".join(f"L{layer} x{scale:g}" for layer, scale in zip(self.layers, self.scales)) or "unsteered"
            prompt = self.prompts[0] if self.prompts else ""
            prompt = prompt if len(prompt) <= 40 else prompt[:39] + "…"
            return f"generate · {steer} ({self.mode}) · {prompt!r}"
        name = (self.dataset or {}).get("name", "?")
        if self.kind == "compute":
            return f"compute · {self.method} at {self.read_position} · {name}"
        return f"sweep · {len(self.layers)} layers x {len(self.scales)} scales ({self.mode}) · {name}"

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "RunRecord":
        if not isinstance(obj, Mapping):
            raise SteerdeskError("A recipe must be a JSON object.")
        fmt = obj.get("format")
        if fmt != FORMAT:
            raise SteerdeskError(f"Not a steerdesk recipe (format {fmt!r}, expected {FORMAT}).")
        kind = obj.get("kind")
        if kind not in KINDS:
            raise SteerdeskError(f"Unknown recipe kind {kind!r}; expected one of {', '.join(KINDS)}.")
        if not isinstance(obj.get("model"), str) or not obj["model"]:
            raise SteerdeskError("The recipe does not say which model to load (field 'model').")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - names - {"format"})
        if unknown:
            log.warning("Ignoring unknown recipe fields: %s", ", ".join(unknown))
        try:
            return cls(**{k: v for k, v in obj.items() if k in names})
        except TypeError as exc:
            raise SteerdeskError(f"A recipe field is malformed: {exc}.") from None

    def save(self, path: str | Path) -> None:
        """Write the recipe (atomic)."""
        from .fileio import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "RunRecord":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SteerdeskError(f"Recipe file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SteerdeskError(f"Cannot read recipe {path}: {exc}") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SteerdeskError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg}).") from None
        return cls.from_dict(obj)


# ============================================================================= identities

def sha256_text(text: str | None) -> str | None:
    return hashlib.sha256(text.encode("utf-8")).hexdigest() if isinstance(text, str) else None


def model_spec(lm: Any) -> str:
    """The spec that loads this model again (``default`` for the embedded SmolLM2)."""
    from .models import EMBEDDED_NAME

    name = lm.info.name
    return "default" if name == EMBEDDED_NAME else name


def _base_fields(lm: Any, kind: str, model: str | None) -> dict[str, Any]:
    from .. import __version__

    info = lm.info
    config = getattr(lm.model, "config", None)
    return {
        "kind": kind,
        "model": model or model_spec(lm),
        "model_name": info.name,
        "model_revision": getattr(config, "_commit_hash", None),
        "architecture": info.architecture,
        "num_layers": info.num_layers,
        "hidden_size": info.hidden_size,
        "dtype": info.dtype,
        "device": info.device,
        "chat_template_sha256": sha256_text(getattr(lm.tokenizer, "chat_template", None)),
        "steerdesk_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def directions_sha256(directions: torch.Tensor) -> str:
    d = directions.detach().to(torch.float32).contiguous().cpu()
    return hashlib.sha256(d.numpy().tobytes()).hexdigest()


def _embed(vectors: Mapping[int, torch.Tensor]) -> dict[str, list[float]]:
    # float32 -> Python float is exact, and JSON keeps a double's shortest round-trip repr.
    return {str(int(k)): [float(x) for x in v.detach().to(torch.float32).cpu().reshape(-1)]
            for k, v in sorted(vectors.items())}


def _dataset_fields(dataset: Dataset, spec: str | None, *, heldout: float = 0.0, seed: int = 0,
                    part: str = "all", max_pairs: int | None = None) -> dict[str, Any]:
    """The dataset as loaded (before any split); rows embedded when there is no file to reload."""
    out: dict[str, Any] = {"spec": spec, "name": dataset.name, "sha256": dataset.sha256(), "paired": dataset.paired,
                           "heldout": heldout, "seed": seed, "part": part, "max_pairs": max_pairs,
                           "rows": len(dataset)}
    if spec is None:
        out["examples"] = [[e.prompt, e.base, e.target] for e in dataset.examples]
    return out


# ============================================================================ constructors

def record_generation(
    lm: Any,
    prompts: Sequence[str],
    results: Sequence[Any],
    *,
    steers: Sequence[Any] = (),
    steered_rows: Sequence[bool] | None = None,
    sampling: Any = None,
    system: str | None = None,
    vector_path: str | None = None,
    vectors: Any = None,
    model: str | None = None,
    seconds: float = 0.0,
) -> RunRecord:
    """Record a :func:`~steerdesk.core.generate.generate` call.

    ``steers`` is the steering applied to the rows flagged in ``steered_rows`` (default: every
    row); the other rows are unsteered (a side-by-side comparison). ``results`` are the
    :class:`~steerdesk.core.generate.GenerationResult` of each row.
    """
    from .generate import SamplingSettings

    sampling = sampling or SamplingSettings()
    steered = list(steered_rows) if steered_rows is not None else [bool(steers)] * len(prompts)
    if len(steered) != len(prompts) or len(results) != len(prompts):
        raise SteerdeskError("A generation record needs one result and one steered flag per prompt.")
    vec: dict[str, Any] | None = None
    if steers:
        vec = {"path": str(vector_path) if vector_path else None,
               "embedded": _embed({s.layer: s.vector for s in steers})}
        if vectors is not None:
            from .sweep import vector_identity

            vec.update({k: v for k, v in vector_identity(vectors, vector_path).items() if k != "path"})
    first = steers[0] if steers else None
    return RunRecord(
        **_base_fields(lm, "generate", model),
        seconds=round(seconds, 3),
        prompts=list(prompts),
        steered_rows=steered,
        system=system,
        vector=vec,
        method=(getattr(vectors, "metadata", {}) or {}).get("method") if vectors is not None else None,
        read_position=(getattr(vectors, "metadata", {}) or {}).get("read_position") if vectors is not None else None,
        layers=[int(s.layer) for s in steers],
        scales=[float(s.scale) for s in steers],
        mode=first.mode if first else None,
        normalize=bool(first.normalize) if first else False,
        positions=first.positions if first else None,
        sampling={"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                  "top_p": sampling.top_p, "seed": sampling.seed},
        seed=sampling.seed,
        settings={"steers": [{"layer": int(s.layer), "scale": float(s.scale), "mode": s.mode,
                              "normalize": bool(s.normalize), "positions": s.positions} for s in steers]},
        outputs={"rows": [{"token_ids": list(r.token_ids), "text": r.text, "finish_reason": r.finish_reason}
                          for r in results]},
    )


def record_compute(
    lm: Any,
    dataset: Dataset,
    vs: Any,
    *,
    dataset_spec: str | None = None,
    heldout: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
    system: str | None = None,
    output: str | None = None,
    model: str | None = None,
    seconds: float = 0.0,
) -> RunRecord:
    """Record a :func:`~steerdesk.core.extract.compute_vectors` call.

    ``dataset`` is the dataset as loaded; with ``heldout > 0`` the vectors came from the training
    part of ``dataset.split(heldout, seed)``.
    """
    meta = getattr(vs, "metadata", {}) or {}
    return RunRecord(
        **_base_fields(lm, "compute", model),
        seconds=round(seconds, 3),
        system=system,
        dataset=_dataset_fields(dataset, dataset_spec, heldout=heldout, seed=seed,
                                part="train" if heldout else "all"),
        method=meta.get("method"),
        read_position=meta.get("read_position"),
        layers=list(range(vs.num_layers)),
        settings={"batch_size": batch_size, "output": str(output) if output else None},
        outputs={"directions_sha256": directions_sha256(vs.directions),
                 "relative_norm": [None if not math.isfinite(x) else x for x in vs.relative_strength().tolist()]},
    )


def record_sweep(
    lm: Any,
    result: Any,
    dataset: Dataset,
    vectors: Any,
    *,
    dataset_spec: str | None = None,
    heldout: float = 0.0,
    seed: int = 0,
    vector_path: str | None = None,
    model: str | None = None,
) -> RunRecord:
    """Record a :func:`~steerdesk.core.sweep.sweep` (``dataset`` as loaded, before the held-out split).

    Without a vector file the swept layers' vectors are embedded.
    """
    s = result.settings
    used = sorted(set(result.layers) | {x for row in result.sets for x in row.layers})
    vec = dict(result.vector)
    if vector_path:
        vec["path"] = str(vector_path)
    elif not vec.get("path"):
        vec["embedded"] = _embed({layer: vectors.directions[layer] if hasattr(vectors, "directions")
                                  else vectors[layer] for layer in used})
    meta = getattr(vectors, "metadata", {}) or {}
    return RunRecord(
        **_base_fields(lm, "sweep", model),
        seconds=result.seconds,
        system=s.get("system"),
        dataset=_dataset_fields(dataset, dataset_spec, heldout=heldout, seed=seed,
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
                  "prefix_reuse": s.get("prefix_reuse"), "neutral_texts": s.get("neutral_texts")},
        outputs={"margin_delta": result.margin_delta, "fluency_delta": result.fluency_delta, "kl": result.kl,
                 "sets": [{"name": r.name, "margin_delta": r.margin_delta, "fluency_delta": r.fluency_delta}
                          for r in result.sets],
                 "best": result.best, "baseline": result.baseline, "path": result.path},
    )


# ================================================================================= rerun

@dataclass
class Rerun:
    """What a re-run gave: a fresh record, whether the outputs match the recipe's, and how not."""

    record: RunRecord
    reproduced: bool
    differences: list[str]
    result: Any = None  # list[GenerationResult] | VectorSet | SweepResult


def _load_for(recipe: RunRecord, device: str | None, progress: Callable[[str], None] | None) -> Any:
    from .models import load_model

    if device is None:
        recorded = (recipe.device or "").split(":")[0]
        device = "cpu" if recorded == "cpu" else "auto"
    return load_model(recipe.model, device=device, dtype=recipe.dtype or "auto", progress=progress)


def _check_model(recipe: RunRecord, lm: Any, changes: list[str]) -> None:
    info = lm.info
    wrong = []
    if recipe.architecture and recipe.architecture != info.architecture:
        wrong.append(f"architecture {info.architecture}, not {recipe.architecture}")
    if recipe.num_layers and recipe.num_layers != info.num_layers:
        wrong.append(f"{info.num_layers} layers, not {recipe.num_layers}")
    if recipe.hidden_size and recipe.hidden_size != info.hidden_size:
        wrong.append(f"hidden size {info.hidden_size}, not {recipe.hidden_size}")
    if wrong:
        raise SteerdeskError(f"The model in hand is not the recipe's ({recipe.model_name or recipe.model}): "
                             + "; ".join(wrong) + ".")
    template = sha256_text(getattr(lm.tokenizer, "chat_template", None))
    if template != recipe.chat_template_sha256:
        changes.append("the model's chat template differs from the recorded one")
    revision = getattr(getattr(lm.model, "config", None), "_commit_hash", None)
    if recipe.model_revision and revision and revision != recipe.model_revision:
        changes.append(f"model revision {revision} differs from the recorded {recipe.model_revision}")
    if recipe.dtype and recipe.dtype != info.dtype:
        changes.append(f"dtype {info.dtype} differs from the recorded {recipe.dtype}")


def _dataset_for(recipe: RunRecord, changes: list[str]) -> tuple[Dataset, Dataset]:
    """``(as loaded, the part that was used)``."""
    from .datasets import resolve_dataset

    d = recipe.dataset
    if not d:
        raise SteerdeskError("The recipe names no dataset.")
    if d.get("examples") is not None:
        ds = Dataset([Example(*row) for row in d["examples"]], name=d.get("name", "recipe"),
                     paired=bool(d.get("paired", True)))
    elif d.get("spec"):
        ds = resolve_dataset(str(d["spec"]))
    else:
        raise SteerdeskError("The recipe's dataset was neither saved to a file nor embedded.")
    if d.get("sha256") and ds.sha256() != d["sha256"]:
        changes.append(f"dataset {d.get('spec') or d.get('name')} has changed since the run (hash differs)")
    heldout = float(d.get("heldout") or 0.0)
    part = d.get("part", "all")
    used = ds
    if heldout and part in ("train", "heldout"):
        train, held = ds.split(heldout, int(d.get("seed") or 0))
        used = train if part == "train" else held
    return ds, used


def _vectors_for(recipe: RunRecord, lm: Any, changes: list[str]) -> tuple[torch.Tensor, Any, str | None]:
    """``(directions [num_layers, hidden], vector set or None, path or None)``."""
    v = recipe.vector or {}
    if v.get("embedded"):
        d = torch.zeros(lm.info.num_layers, lm.info.hidden_size)
        for key, values in v["embedded"].items():
            layer = int(key)
            if not 0 <= layer < lm.info.num_layers or len(values) != lm.info.hidden_size:
                raise SteerdeskError(f"The recipe's embedded vector for layer {key} does not fit the model.")
            d[layer] = torch.tensor(values, dtype=torch.float32)
        return d, None, v.get("path")
    path = v.get("path")
    if not path:
        raise SteerdeskError("The recipe names no vector file and embeds no vectors.")
    from .vectors import import_gguf, load_vectors

    vs = import_gguf(path, num_layers=lm.info.num_layers) if str(path).lower().endswith(".gguf") else load_vectors(path)
    vs.check_compatible(lm.info)
    want = v.get("directions_sha256")
    if want and directions_sha256(vs.directions) != want:
        changes.append(f"vector file {path} has changed since the run (hash differs)")
    return vs.directions, vs, str(path)


def _close(a: Any, b: Any, tol: float) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    return abs(float(a) - float(b)) <= tol


def rerun(
    recipe: RunRecord,
    *,
    lm: Any = None,
    device: str | None = None,
    allow_changes: bool = False,
    output: str | None = None,
    progress: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
    on_text: Callable[[int, str], None] | None = None,
) -> Rerun:
    """Execute a recipe again (with ``lm`` if given, else loading the recorded model).

    Refuses, with the reasons, when the recorded inputs have changed (dataset or vector file
    hash, chat template, revision, dtype), unless ``allow_changes``. ``output`` writes the
    recomputed vectors (compute) or the sweep result (sweep) there.
    """
    changes: list[str] = []
    if lm is None:
        lm = _load_for(recipe, device, progress)
    _check_model(recipe, lm, changes)
    t0 = time.perf_counter()
    if recipe.kind == "generate":
        return _rerun_generate(recipe, lm, changes, allow_changes, t0, cancel, on_text)
    if recipe.kind == "compute":
        return _rerun_compute(recipe, lm, changes, allow_changes, t0, output, cancel)
    return _rerun_sweep(recipe, lm, changes, allow_changes, output, cancel)


def _refuse_changes(changes: list[str], allow: bool) -> None:
    if changes and not allow:
        raise SteerdeskError("The recipe's inputs have changed: " + "; ".join(changes)
                             + " (re-run anyway with allow_changes / --allow-changes).")


def _rerun_generate(recipe: RunRecord, lm: Any, changes: list[str], allow: bool, t0: float,
                    cancel: threading.Event | None, on_text: Callable[[int, str], None] | None) -> Rerun:
    from .generate import SamplingSettings, generate
    from .steering import Steer

    if not recipe.prompts:
        raise SteerdeskError("The recipe has no prompt.")
    steer_specs = recipe.settings.get("steers")
    if steer_specs is None:  # a hand-written recipe: one setting for every layer
        steer_specs = [{"layer": layer, "scale": scale, "mode": recipe.mode or "add", "normalize": recipe.normalize,
                        "positions": recipe.positions or "all"} for layer, scale in zip(recipe.layers, recipe.scales)]
    directions = None
    vs = None
    path = None
    if steer_specs:
        directions, vs, path = _vectors_for(recipe, lm, changes)
    _refuse_changes(changes, allow)
    if steer_specs:
        from .vectors import VectorSet

        have = vs if vs is not None else VectorSet(directions, torch.full((directions.shape[0],), float("nan")))  # type: ignore[union-attr]
        have.require_layers(sorted({int(s["layer"]) for s in steer_specs}))  # no silent no-op on re-run
    steers = [Steer(layer=int(s["layer"]), vector=directions[int(s["layer"])], scale=float(s["scale"]),  # type: ignore[index]
                    mode=str(s.get("mode", "add")), normalize=bool(s.get("normalize", False)),
                    positions=str(s.get("positions", "all"))) for s in steer_specs]
    flags = recipe.steered_rows or [bool(steers)] * len(recipe.prompts)
    rows = [list(steers) if flag else [] for flag in flags]
    sampling = SamplingSettings(**{k: v for k, v in (recipe.sampling or {}).items()
                                   if k in ("max_new_tokens", "temperature", "top_p", "seed")})
    results = generate(lm, recipe.prompts, rows, sampling=sampling, system=recipe.system, stop=cancel,
                       on_text=on_text)
    record = record_generation(lm, recipe.prompts, results, steers=steers, steered_rows=flags, sampling=sampling,
                               system=recipe.system, vector_path=path, vectors=vs, model=recipe.model,
                               seconds=time.perf_counter() - t0)
    old = [r.get("token_ids") for r in recipe.outputs.get("rows", [])]
    new = [list(r.token_ids) for r in results]
    differences = [f"row {i}: tokens differ from the record (first at token "
                   f"{next((k for k, (a, b) in enumerate(zip(o, n)) if a != b), min(len(o), len(n)))})"
                   for i, (o, n) in enumerate(zip(old, new)) if o != n]
    if len(old) != len(new):
        differences.append(f"the record has {len(old)} output rows, the re-run {len(new)}")
    return Rerun(record, reproduced=not differences, differences=changes + differences, result=results)


def _rerun_compute(recipe: RunRecord, lm: Any, changes: list[str], allow: bool, t0: float, output: str | None,
                   cancel: threading.Event | None) -> Rerun:
    from .extract import compute_vectors
    from .vectors import export_gguf, save_vectors

    loaded, used = _dataset_for(recipe, changes)
    _refuse_changes(changes, allow)
    batch = int(recipe.settings.get("batch_size") or 8)
    vs = compute_vectors(lm, used, method=recipe.method or "mean-diff", read=recipe.read_position or "last",
                         batch_size=batch, system=recipe.system, cancel=cancel)
    if output:
        if str(output).lower().endswith(".gguf"):
            export_gguf(vs, output)
        else:
            save_vectors(vs, output)
    d = recipe.dataset or {}
    record = record_compute(lm, loaded, vs, dataset_spec=d.get("spec"), heldout=float(d.get("heldout") or 0.0),
                            seed=int(d.get("seed") or 0), batch_size=batch, system=recipe.system, output=output,
                            model=recipe.model, seconds=time.perf_counter() - t0)
    want = recipe.outputs.get("directions_sha256")
    same = want is None or record.outputs["directions_sha256"] == want
    differences = [] if same else ["the vectors differ from the recorded ones (directions hash)"]
    return Rerun(record, reproduced=same, differences=changes + differences, result=vs)


def _rerun_sweep(recipe: RunRecord, lm: Any, changes: list[str], allow: bool, output: str | None,
                 cancel: threading.Event | None) -> Rerun:
    from .sweep import sweep

    loaded, used = _dataset_for(recipe, changes)
    directions, vs, path = _vectors_for(recipe, lm, changes)
    _refuse_changes(changes, allow)
    s = recipe.settings
    result = sweep(lm, vs if vs is not None else directions, used, layers=recipe.layers, scales=recipe.scales,
                   sets=s.get("sets") or None, mode=recipe.mode or "add", normalize=recipe.normalize,
                   positions=recipe.positions or "all", fluency_budget=float(s.get("fluency_budget", 0.5)),
                   neutral=s.get("neutral_texts"), system=recipe.system,
                   max_pairs=(recipe.dataset or {}).get("max_pairs"), batch_size=int(s.get("batch_size") or 16),
                   max_rows=int(s.get("max_rows") or 64), prefix_reuse=bool(s.get("prefix_reuse", True)),
                   vector_path=path, cancel=cancel)
    if output:
        result.save(output)
    d = recipe.dataset or {}
    record = record_sweep(lm, result, loaded, vs if vs is not None else directions, dataset_spec=d.get("spec"),
                          heldout=float(d.get("heldout") or 0.0), seed=int(d.get("seed") or 0), vector_path=path,
                          model=recipe.model)
    differences = []
    for key in ("margin_delta", "fluency_delta"):
        if not _close(recipe.outputs.get(key), getattr(result, key), 1e-4):
            differences.append(f"{key.replace('_', ' ')} differs from the record by more than 1e-4")
    return Rerun(record, reproduced=not differences, differences=changes + differences, result=result)


__all__ = ["RunRecord", "Rerun", "record_generation", "record_compute", "record_sweep", "rerun", "model_spec",
           "FORMAT", "KINDS"]
