"""What identifies a model and a vector set in results and records, and the checks against them.

One home for the hashes and identity dicts that sweeps and run records store (``model`` and
``vector`` blocks of a sweep file; the header and ``vector`` field of a recipe), and for the
comparison of a model in hand with the one something was made for.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch

from .models import EMBEDDED_NAME, LoadedModel, ModelInfo

if TYPE_CHECKING:  # vectors imports this module (lazily): only annotations need VectorSet
    from .vectors import VectorSet

__all__ = ["directions_of", "directions_sha256", "model_identity", "model_mismatches", "model_revision",
           "model_spec", "sha256_text", "template_sha256", "vector_identity"]

#: Metadata keys of a vector set copied into its identity (when present).
VECTOR_META_KEYS = ("model", "architecture", "method", "read_position", "dataset_name", "dataset_sha256", "created")


def sha256_text(text: str | None) -> str | None:
    """Hex SHA-256 of ``text`` as UTF-8; ``None`` when it is not a string."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest() if isinstance(text, str) else None


def template_sha256(lm: LoadedModel) -> str | None:
    """Hash of the tokenizer's chat template (``None`` without one)."""
    return sha256_text(getattr(lm.tokenizer, "chat_template", None))


def model_revision(lm: LoadedModel) -> str | None:
    """The hub commit the model's config came from, when the hub gave one."""
    return getattr(getattr(lm.model, "config", None), "_commit_hash", None)


def model_spec(lm: LoadedModel) -> str:
    """The spec that loads this model again (``default`` for the embedded SmolLM2)."""
    name = lm.info.name
    return "default" if name == EMBEDDED_NAME else name


def model_identity(lm: LoadedModel) -> dict[str, Any]:
    """Model id, revision (when the hub gave one), architecture, dtype, device, chat template hash."""
    info = lm.info
    return {
        "name": info.name,
        "architecture": info.architecture,
        "revision": model_revision(lm),
        "num_layers": info.num_layers,
        "hidden_size": info.hidden_size,
        "dtype": info.dtype,
        "device": info.device,
        "chat_template_sha256": template_sha256(lm),
        **({"quantization": info.quantization} if info.quantization else {}),
    }


def directions_of(vectors: VectorSet | torch.Tensor) -> torch.Tensor:
    """The ``[num_layers, hidden]`` directions of a vector set (or the tensor itself).

    Raises ``SteerdeskError`` for anything else.
    """
    from .errors import SteerdeskError

    d = getattr(vectors, "directions", vectors)
    if not isinstance(d, torch.Tensor) or d.ndim != 2:
        raise SteerdeskError("The sweep needs a vector set ([layers, hidden] directions).")
    return d


def directions_sha256(directions: torch.Tensor) -> str:
    """Hex SHA-256 of the directions as contiguous float32 bytes (the same on every device)."""
    d = directions.detach().to(torch.float32).contiguous().cpu()
    return hashlib.sha256(d.numpy().tobytes()).hexdigest()


def vector_identity(vectors: VectorSet | torch.Tensor, path: str | None = None) -> dict[str, Any]:
    """What identifies a vector set (or a ``[layers, hidden]`` tensor) in a result or a record."""
    meta = dict(getattr(vectors, "metadata", {}) or {})
    out: dict[str, Any] = {k: meta[k] for k in VECTOR_META_KEYS if k in meta}
    out["directions_sha256"] = directions_sha256(directions_of(vectors))
    if path is not None:
        out["path"] = str(path)
    return out


def model_mismatches(info: ModelInfo, *, architecture: str | None = None, num_layers: int | None = None,
                     hidden_size: int | None = None) -> dict[str, tuple[Any, Any]]:
    """``{field: (expected, in hand)}`` for each of architecture / num_layers / hidden_size that is
    given (truthy) and differs from ``info``: the one shape check behind the vector-set check and
    the re-run check (each words its own sentence)."""
    out: dict[str, tuple[Any, Any]] = {}
    for key, want in (("architecture", architecture), ("num_layers", num_layers), ("hidden_size", hidden_size)):
        have = getattr(info, key)
        if want and want != have:
            out[key] = (want, have)
    return out
