"""Reading a recipe's inputs back: is the model in hand the recorded one, and the dataset and
vectors it names (checked by hash). ``steerdesk.jobs.rerun`` builds the job's Spec from these.

Each function appends to ``changes`` a sentence per input that differs from the recorded one
(the re-run refuses them unless allowed) and raises ``SteerdeskError`` for what cannot be used.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .datasets import Dataset, Example
from .errors import SteerdeskError
from .identity import directions_sha256, model_mismatches, model_revision, template_sha256
from .models import LoadedModel
from .records import RunRecord
from .vectors import VectorSet

__all__ = ["check_model", "close", "dataset_of", "refuse_changes", "vectors_of"]


def check_model(recipe: RunRecord, lm: LoadedModel, changes: list[str]) -> None:
    """Refuse a model of another shape (``SteerdeskError``); note a changed chat template,
    revision or dtype in ``changes``."""
    info = lm.info
    wrong = model_mismatches(info, architecture=recipe.architecture, num_layers=recipe.num_layers,
                             hidden_size=recipe.hidden_size)
    words = {"architecture": "architecture {1}, not {0}", "num_layers": "{1} layers, not {0}",
             "hidden_size": "hidden size {1}, not {0}"}
    if wrong:
        raise SteerdeskError(f"The model in hand is not the recipe's ({recipe.model_name or recipe.model}): "
                             + "; ".join(words[key].format(*wrong[key]) for key in words if key in wrong) + ".")
    if template_sha256(lm) != recipe.chat_template_sha256:
        changes.append("the model's chat template differs from the recorded one")
    revision = model_revision(lm)
    if recipe.model_revision and revision and revision != recipe.model_revision:
        changes.append(f"model revision {revision} differs from the recorded {recipe.model_revision}")
    if recipe.dtype and recipe.dtype != info.dtype:
        changes.append(f"dtype {info.dtype} differs from the recorded {recipe.dtype}")


def dataset_of(recipe: RunRecord, changes: list[str]) -> tuple[Dataset, Dataset]:
    """``(the dataset as loaded, the part the run used)``: from its file or the embedded rows."""
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


def vectors_of(recipe: RunRecord, lm: LoadedModel, changes: list[str]) -> tuple[VectorSet, bool, str | None]:
    """``(vector set, from a file?, path or None)``.

    Embedded vectors become a set of ``[num_layers, hidden]`` directions, zero (no direction)
    at the layers the recipe does not carry; a vector file is loaded, checked against the model
    and its hash compared with the recorded one.
    """
    v = recipe.vector or {}
    if v.get("embedded"):
        d = torch.zeros(lm.info.num_layers, lm.info.hidden_size)
        for key, values in v["embedded"].items():
            layer = int(key)
            if not 0 <= layer < lm.info.num_layers or len(values) != lm.info.hidden_size:
                raise SteerdeskError(f"The recipe's embedded vector for layer {key} does not fit the model.")
            d[layer] = torch.tensor(values, dtype=torch.float32)
        return VectorSet(d, torch.full((d.shape[0],), float("nan"))), False, v.get("path")
    path = v.get("path")
    if not path:
        raise SteerdeskError("The recipe names no vector file and embeds no vectors.")
    from .vectors import import_gguf, load_vectors

    vs = import_gguf(path, num_layers=lm.info.num_layers) if str(path).lower().endswith(".gguf") else load_vectors(path)
    vs.check_compatible(lm.info)
    want = v.get("directions_sha256")
    if want and directions_sha256(vs.directions) != want:
        changes.append(f"vector file {path} has changed since the run (hash differs)")
    return vs, True, str(path)


def refuse_changes(changes: list[str], allow: bool) -> None:
    """``SteerdeskError`` listing ``changes`` unless ``allow`` (or nothing changed)."""
    if changes and not allow:
        raise SteerdeskError("The recipe's inputs have changed: " + "; ".join(changes)
                             + " (re-run anyway with allow_changes / --allow-changes).")


def close(a: Any, b: Any, tol: float) -> bool:
    """Nested lists of numbers equal within ``tol`` (``None`` only matches ``None``; NaN never)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    diff = abs(float(a) - float(b))
    return not math.isnan(diff) and diff <= tol
