"""Run records: what was run, on what, with which settings, and what came out; JSON recipes to re-run.

A :class:`RunRecord` is a :class:`RecordHeader` common to every job (model identity, versions,
time, seconds) plus the job's payload: its inputs (prompts, dataset, vector), settings and
``outputs``, whose shape per kind is given by the ``*Outputs`` types below. A record exported as
JSON is a **recipe**: ``steerdesk.jobs.rerun`` turns it back into the job's Spec and runs the
same job again (the core does not re-run anything itself). A greedy generation on the same model,
dtype and device reproduces its tokens exactly.

A recipe is self-contained where that is cheap: the steering vectors of a generation are
embedded (the layers used, float32 values written exactly), and so is a dataset that was never
saved to a file. Vector files and dataset files are referenced by path and checked by hash.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict

import torch

from .datasets import Dataset
from .errors import SteerdeskError
from .generate import SamplingSettings
from .identity import directions_sha256, model_revision, model_spec, sha256_text, template_sha256, vector_identity
from .models import LoadedModel
from .vectors import VectorSet

log = logging.getLogger(__name__)

FORMAT = "steerdesk.recipe/1"
KINDS = ("generate", "compute", "sweep", "diagnose", "versus", "grid", "compare")


# ================================================================================ payloads

class RowOutput(TypedDict):
    """One generated row of a ``generate`` record."""
    token_ids: list[int]
    text: str
    finish_reason: str


class GenerateOutputs(TypedDict):
    """``outputs`` of a ``generate`` record: one row per prompt."""

    rows: list[RowOutput]


class ComputeOutputs(TypedDict):
    """``outputs`` of a ``compute`` record (``relative_norm``: ``None`` where not finite)."""

    directions_sha256: str
    relative_norm: list[float | None]


class SweepOutputs(TypedDict):
    """``outputs`` of a ``sweep`` record: the result's cells, best cell, baseline and path."""

    margin_delta: list[list[float | None]]
    fluency_delta: list[list[float | None]]
    kl: list[list[float | None]] | None
    sets: list[dict[str, Any]]
    best: dict[str, Any] | None
    baseline: dict[str, Any]
    path: str


class DiagnoseOutputs(TypedDict):
    """``outputs`` of a ``diagnose`` record: :meth:`Diagnostics.to_dict`."""

    diagnostics: dict[str, Any]


class VersusOutputs(TypedDict):
    """``outputs`` of a ``versus`` record: :meth:`Versus.to_dict`."""

    versus: dict[str, Any]


class GridOutputs(TypedDict):
    """``outputs`` of a ``grid`` record: one entry per generated text, in grid order."""

    rows: list[dict[str, Any]]


class CompareOutputs(TypedDict):
    """``outputs`` of a ``compare`` record: :meth:`MethodComparison.to_dict`."""

    comparison: dict[str, Any]


# ================================================================================== record

@dataclass
class RecordHeader:
    """What every record starts with: the job, the model it ran on, versions, time and duration."""

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
    created: str = ""  # UTC, ISO 8601 to the second
    seconds: float = 0.0  # wall time of the run
    quantization: str = ""  # "int8" / "int4" for a model loaded with quantize=... (omitted from JSON when "")

    @staticmethod
    def fields_for(lm: LoadedModel, kind: str, model: str | None, seconds: float = 0.0) -> dict[str, Any]:
        """The header of a run of ``kind`` on ``lm`` now (``model``: how to load it again)."""
        from .. import __version__

        info = lm.info
        return {
            "kind": kind,
            "model": model or model_spec(lm),
            "model_name": info.name,
            "model_revision": model_revision(lm),
            "architecture": info.architecture,
            "num_layers": info.num_layers,
            "hidden_size": info.hidden_size,
            "dtype": info.dtype,
            "device": info.device,
            "chat_template_sha256": template_sha256(lm),
            "steerdesk_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": seconds,
            "quantization": info.quantization,
        }


@dataclass
class RunRecord(RecordHeader):
    """One run: the header, then the job's payload. Fields that do not apply to a kind stay empty.

    For ``generate``, ``layers[i]`` is steered at ``scales[i]``; for ``sweep`` and ``grid``,
    ``layers`` and ``scales`` are the grid's axes. ``outputs`` has the shape of the kind's
    ``*Outputs`` type; ``settings`` holds the kind's extra settings.
    """

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

    @property
    def header(self) -> RecordHeader:
        """The common header alone."""
        return RecordHeader(**{f.name: getattr(self, f.name) for f in fields(RecordHeader)})

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
        if self.kind == "diagnose":
            return f"diagnose · {self.num_layers} layers · {name}"
        if self.kind == "versus":
            return f"versus · L{','.join(map(str, self.layers))} x{self.scales[0] if self.scales else 0:g} · {name}"
        if self.kind == "compare":
            methods = ", ".join(self.settings.get("methods") or [])
            return f"compare · {methods} · L{','.join(map(str, self.layers))} · {name}"
        if self.kind == "grid":
            return f"grid · {len(self.layers)} layers x {len(self.scales)} scales x {len(self.prompts)} prompts"
        return f"sweep · {len(self.layers)} layers x {len(self.scales)} scales ({self.mode}) · {name}"

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The recipe as a JSON object (``format`` first, then header, then payload fields)."""
        obj = {"format": FORMAT, **asdict(self)}
        if not obj["quantization"]:
            del obj["quantization"]  # recipes of unquantised models read as they always did
        return obj

    def to_json(self) -> str:
        """The recipe as JSON text (no NaN: ``ValueError`` if a non-finite number slipped in)."""
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> RunRecord:
        """Read a recipe object; ``SteerdeskError`` for another format, kind or malformed field."""
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
    def load(cls, path: str | Path) -> RunRecord:
        """Read a recipe file; ``SteerdeskError`` naming the file when it cannot be read."""
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


# ============================================================================ helpers

def embed_vectors(vectors: Mapping[int, torch.Tensor]) -> dict[str, list[float]]:
    """``{layer: [hidden]}`` -> ``{"layer": [floats]}``: float32 -> Python float is exact, and JSON
    keeps a double's shortest round-trip repr, so a recipe carries the vectors bit for bit."""
    return {str(int(k)): [float(x) for x in v.detach().to(torch.float32).cpu().reshape(-1)]
            for k, v in sorted(vectors.items())}


def dataset_fields(dataset: Dataset, spec: str | None, *, heldout: float = 0.0, seed: int = 0,
                   part: str = "all", max_pairs: int | None = None) -> dict[str, Any]:
    """The dataset as loaded (before any split); rows embedded when there is no file to reload.

    ``part`` is the part of ``dataset.split(heldout, seed)`` the run used: train / heldout / all.
    """
    out: dict[str, Any] = {"spec": spec, "name": dataset.name, "sha256": dataset.sha256(), "paired": dataset.paired,
                           "heldout": heldout, "seed": seed, "part": part, "max_pairs": max_pairs,
                           "rows": len(dataset)}
    if spec is None:
        out["examples"] = [[e.prompt, e.base, e.target] for e in dataset.examples]
    return out


def vector_fields(vectors: VectorSet | torch.Tensor, layers: Sequence[int], path: str | None) -> dict[str, Any]:
    """A vector file by path and identity, or (no file) the used layers' vectors embedded."""
    if path:
        return vector_identity(vectors, path)
    d = vectors.directions if isinstance(vectors, VectorSet) else vectors
    return {**vector_identity(vectors), "embedded": embed_vectors({layer: d[layer] for layer in layers})}


def vector_metadata(vectors: Any) -> dict[str, Any]:
    """A copy of a vector set's metadata (``{}`` for a tensor or ``None``)."""
    return dict(getattr(vectors, "metadata", {}) or {})


def sampling_fields(sampling: SamplingSettings) -> dict[str, Any]:
    """How a record stores sampling settings."""
    return {"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "seed": sampling.seed}


# ============================================================================ constructors
_CONSTRUCTORS = ("record_compare", "record_compute", "record_diagnose", "record_generation", "record_grid",
                 "record_sweep", "record_versus")


def __getattr__(name: str) -> Any:
    """The per-kind constructors live in :mod:`steerdesk.core.record_kinds`; also importable from here."""
    if name in _CONSTRUCTORS:
        from . import record_kinds

        return getattr(record_kinds, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FORMAT", "KINDS", "CompareOutputs", "ComputeOutputs", "DiagnoseOutputs", "GenerateOutputs", "GridOutputs",
           "RecordHeader", "RowOutput", "RunRecord", "SweepOutputs", "VersusOutputs", "dataset_fields", "embed_vectors",
           "model_spec", "sampling_fields", "sha256_text", "directions_sha256", "vector_fields", "vector_metadata"]
# record_compare / record_compute / record_diagnose / record_generation / record_grid / record_sweep / record_versus are
# importable from here too (module __getattr__); they are defined in steerdesk.core.record_kinds.
