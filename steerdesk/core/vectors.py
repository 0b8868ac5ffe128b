"""Vector-set files: steerdesk safetensors (with metadata) and llama.cpp GGUF control vectors.

GGUF layer mapping (checked against llama.cpp ``common/common.cpp``
``common_control_vector_load_one`` and ``src/llama-adapter.cpp`` ``llama_adapter_cvec``):
tensor ``direction.N`` is added to the residual stream at the **output of block N**
(0-based; ``cvec->apply_to(cur, il)`` at the end of layer ``il``). ``direction.0`` is
rejected by llama.cpp, so block 0 cannot be expressed and is left out on export.
This is exactly steerdesk's ``block_output`` convention: steerdesk layer L <-> ``direction.L``.
(repeng writes the same mapping; llama.cpp's own cvector-generator reads one block early.)
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import SteerdeskError
from .fileio import atomic_write_with
from .models import ModelInfo
from .parsing import check_layers, format_ranges
from .steering import Steer

FORMAT = "steerdesk.vectors/1"
REQUIRED_METADATA = ("format", "model", "architecture", "num_layers", "hidden_size", "method",
                     "read_position", "layer_convention")


@dataclass
class VectorSet:
    """Per-layer steering directions and what they were computed from."""

    directions: torch.Tensor  # [num_layers, hidden] float32, raw (unnormalised)
    norms: torch.Tensor  # [num_layers] typical |h_L| at the read tokens (NaN if unknown)
    metadata: dict[str, str] = field(default_factory=dict)
    proj_base: torch.Tensor | None = None  # [num_layers, n_base]
    proj_target: torch.Tensor | None = None  # [num_layers, n_target]
    extraction: Any = None  # raw reads, kept only in memory on request
    # [num_layers] bool: True where the set HAS a direction for the layer. A GGUF control vector
    # has no slot for block 0 and other tools' files may skip layers: those layers are absent,
    # not "zero". Default (None): every layer whose vector is non-zero.
    present: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.directions.ndim != 2:
            return  # refused with a clear message by the loader's validation
        if self.present is None:
            self.present = self.directions.detach().float().norm(dim=-1) > 0
        else:
            self.present = torch.as_tensor(self.present).reshape(-1).bool()
        if self.present.shape[0] != self.directions.shape[0]:
            raise SteerdeskError(
                f"'present' has {self.present.shape[0]} entries for {self.directions.shape[0]} layers.")

    def has_direction(self, layer: int) -> bool:
        """True when the set has a non-zero direction for block ``layer`` (0-based)."""
        if not 0 <= layer < self.num_layers:
            return False
        return bool(self.present[layer]) and float(self.directions[layer].float().norm()) > 0  # type: ignore[index]

    @property
    def layers_with_direction(self) -> list[int]:
        """The layers this set can steer, ascending."""
        return [layer for layer in range(self.num_layers) if self.has_direction(layer)]

    def layers_without_direction(self, layers: Sequence[int]) -> list[int]:
        """Those of ``layers`` (in range) for which the set has no direction (absent or all-zero)."""
        return [layer for layer in layers if 0 <= layer < self.num_layers and not self.has_direction(layer)]

    def require_layers(self, layers: Sequence[int]) -> None:
        """Raise ``SteerdeskError`` (one line) unless every layer is in range and has a direction.

        Steering a layer the set has no direction for would silently do nothing: it is refused.
        """
        check_layers(layers, self.num_layers, of="vectors")
        missing = self.layers_without_direction(layers)
        if missing:
            raise SteerdeskError(no_direction_message(missing, self))

    def steers(self, layers: Sequence[int], *, scale: float = 1.0, mode: str = "add", normalize: bool = False,
               positions: str = "all") -> list[Steer]:
        """One :class:`Steer` per layer, after :meth:`require_layers` (no silent no-op steering)."""
        self.require_layers(layers)
        return [Steer(layer=layer, vector=self.directions[layer], scale=scale, mode=mode, normalize=normalize,
                      positions=positions) for layer in layers]

    @property
    def num_layers(self) -> int:
        """Layers (rows of ``directions``)."""
        return int(self.directions.shape[0])

    @property
    def hidden_size(self) -> int:
        """Hidden size (columns of ``directions``)."""
        return int(self.directions.shape[1])

    def relative_strength(self, scale: float = 1.0, normalize: bool = False) -> torch.Tensor:
        """``|scale * v_L| / typical |h_L|`` per layer (NaN where the norm is unknown)."""
        v = self.directions.norm(dim=-1)
        size = torch.ones_like(v) if normalize else v
        return (abs(scale) * size) / self.norms

    def check_compatible(self, info: ModelInfo) -> None:
        """Refuse vectors made for another model, with a sentence that says what differs."""
        from .identity import model_mismatches

        wrong = model_mismatches(info, architecture=self.metadata.get("architecture"), num_layers=self.num_layers,
                                 hidden_size=self.hidden_size)
        words = {"hidden_size": "hidden size {} vs {}", "num_layers": "{} layers vs {}",
                 "architecture": "architecture {} vs {}"}
        differences = [words[key].format(*wrong[key]) for key in words if key in wrong]
        if differences:
            made_for = self.metadata.get("model", "another model")
            raise SteerdeskError(
                f"These vectors were made for {made_for}, not {info.name}: " + "; ".join(differences) + "."
            )
        convention = self.metadata.get("layer_convention", "block_output")
        if convention != "block_output":
            raise SteerdeskError(f"Unknown layer convention {convention!r} in the vector file.")

    def in_sample_note(self, scored: Any) -> str | None:
        """A sentence when the pairs ``scored`` (a :class:`~steerdesk.core.datasets.Dataset`) include
        the pairs these vectors were computed from, so a margin measured on them is in-sample.

        Recognised from the set's ``dataset_sha256``: the scored pairs themselves, or the training
        part of their split with the default seed (``compute --heldout F`` followed by a sweep of
        the whole file). ``None`` when neither matches (another dataset, or the held-out part).
        """
        made_from = self.metadata.get("dataset_sha256")
        if not made_from or not len(scored):
            return None
        same = made_from == scored.sha256()
        n_used = int(self.metadata.get("num_examples", "0") or 0)
        if not same and 0 < n_used < len(scored):
            train = scored.split((len(scored) - n_used) / len(scored))[0]
            same = made_from == train.sha256()
        if not same:
            return None
        return (f"the vectors were computed from {n_used or len(scored)} of these {len(scored)} pairs, so the scores "
                f"are in-sample; score the held-out part instead (--heldout F, the F given to compute).")

    def other_model_note(self, info: ModelInfo) -> str | None:
        """A sentence when the set names another model than ``info`` though shapes and architecture
        fit (:meth:`check_compatible` passed): e.g. a vector moved from a base model to its
        fine-tune, which works but is the user's call. ``None`` when the names agree or the file
        names no model (GGUF control vectors)."""
        made_for = self.metadata.get("model", "")
        if not made_for or made_for == "unknown" or made_for == info.name:
            return None
        return (f"these vectors were computed on {made_for}, the loaded model is {info.name} (same architecture and "
                f"sizes, so they are used as they are).")


def no_direction_message(missing: Sequence[int], vs: VectorSet) -> str:
    """One line saying which requested layers the set has no direction for, and which it has."""
    which = "layer" if len(missing) == 1 else "layers"
    have = vs.layers_with_direction
    why = " (a llama.cpp control vector has no slot for block 0)" if 0 in missing and \
        vs.metadata.get("source_format") == "gguf" else ""
    return (f"The vector set has no direction for {which} {format_ranges(missing)}{why}: steering there would do "
            f"nothing. It has {'layers ' + format_ranges(have) if have else 'no usable layer'}.")


def layers_without_direction(vectors: VectorSet | torch.Tensor, layers: Sequence[int]) -> list[int]:
    """Those of ``layers`` the vectors have no direction for (issue 10: absent is not zero).

    A :class:`~steerdesk.core.vectors.VectorSet` answers itself (a GGUF control vector has no
    block 0; other tools' files may skip layers); for a raw ``[layers, hidden]`` tensor an all-zero
    row is taken as no direction.
    """
    ask = getattr(vectors, "layers_without_direction", None)
    if callable(ask):
        return [int(x) for x in ask(list(layers))]
    from .identity import directions_of

    d = directions_of(vectors)
    return [int(x) for x in layers if 0 <= x < d.shape[0] and not bool(d[x].detach().ne(0).any())]


def rows_without_direction(vectors: VectorSet | torch.Tensor, rows: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per sweep row (its layers), the layers without a direction; an empty list = the row can run."""
    return [layers_without_direction(vectors, ls) for ls in rows]


# ------------------------------------------------------------------------- safetensors

def save_vectors(vs: VectorSet, path: str | Path) -> None:
    """Save as safetensors (atomic): ``directions``, ``norms`` (+ projections) and metadata."""
    from safetensors.torch import save_file

    tensors = {"directions": vs.directions.float().contiguous(), "norms": vs.norms.float().contiguous()}
    tensors["present"] = vs.present.to(torch.uint8).contiguous()  # type: ignore[union-attr]
    if vs.proj_base is not None and vs.proj_target is not None:
        tensors["proj_base"] = vs.proj_base.float().contiguous()
        tensors["proj_target"] = vs.proj_target.float().contiguous()
    metadata = {k: str(v) for k, v in vs.metadata.items()}
    metadata["format"] = FORMAT
    metadata.setdefault("layer_convention", "block_output")
    metadata.setdefault("architecture", "")  # unknown (a foreign GGUF): not checked, but the key must exist
    metadata["num_layers"] = str(vs.num_layers)
    metadata["hidden_size"] = str(vs.hidden_size)
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _validate_loaded(vs: VectorSet, path: Path) -> VectorSet:
    d = vs.directions
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 1:
        raise SteerdeskError(f"{path}: 'directions' must be a [layers, hidden] matrix, got shape {tuple(d.shape)}.")
    if not bool(torch.isfinite(d).all()):
        bad = sorted({int(i) for i in torch.nonzero(~torch.isfinite(d))[:, 0]})
        raise SteerdeskError(f"{path}: the vector for layer {bad[0]} contains NaN or infinite values.")
    if vs.norms.shape != (d.shape[0],):
        raise SteerdeskError(f"{path}: 'norms' must have one value per layer ({d.shape[0]}), "
                             f"got shape {tuple(vs.norms.shape)}.")
    return vs


def load_vectors(path: str | Path, model_layers: int | None = None) -> VectorSet:
    """Load a steerdesk safetensors vector file or a GGUF control vector (by extension).

    A foreign GGUF (no steerdesk metadata) only tells its highest ``direction.N``; with
    ``model_layers`` it is padded to the model's depth when it fits (padded layers are absent).
    """
    path = Path(path)
    if not path.is_file():
        raise SteerdeskError(f"Vector file not found: {path}")
    if path.suffix.lower() == ".gguf":
        vs = import_gguf(path)
        if model_layers and "architecture" not in vs.metadata and vs.num_layers < model_layers:
            vs = import_gguf(path, num_layers=model_layers)
        return vs
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            keys = set(f.keys())
            if "directions" not in keys:
                raise SteerdeskError(f"{path}: not a steerdesk vector file (no 'directions' tensor).")
            tensors = {k: f.get_tensor(k) for k in keys}
    except SteerdeskError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SteerdeskError(f"{path}: not a readable safetensors file ({why}).") from None
    fmt = metadata.get("format")
    if fmt != FORMAT:
        raise SteerdeskError(f"{path}: unknown vector format {fmt!r} (expected {FORMAT}).")
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise SteerdeskError(f"{path}: metadata is missing {', '.join(missing)}.")
    directions = tensors["directions"].float()
    norms = tensors.get("norms")
    if norms is None:
        norms = torch.full((directions.shape[0],), float("nan"))
    present = tensors.get("present")
    if present is not None and (present.ndim != 1 or directions.ndim != 2 or present.shape[0] != directions.shape[0]):
        raise SteerdeskError(f"{path}: 'present' must have one entry per layer, got shape {tuple(present.shape)}.")
    vs = VectorSet(directions=directions, norms=norms.float(), metadata=metadata,
                   proj_base=tensors.get("proj_base"), proj_target=tensors.get("proj_target"),
                   present=None if present is None else present.bool())
    for key, size in (("num_layers", vs.directions.shape[0] if vs.directions.ndim == 2 else -1),
                      ("hidden_size", vs.directions.shape[-1] if vs.directions.ndim else -1)):
        if metadata.get(key) != str(size):
            raise SteerdeskError(f"{path}: metadata says {key}={metadata.get(key)} but the tensor has {size}.")
    return _validate_loaded(vs, path)


# ------------------------------------------------------------------------------- GGUF

def export_gguf(vs: VectorSet, path: str | Path, *, model_hint: str | None = None) -> list[int]:
    """Write a llama.cpp control vector; returns the layers written (block 0 cannot be)."""
    import gguf

    hint = model_hint or _model_hint(vs.metadata)
    layers = [layer for layer in range(1, vs.num_layers) if vs.has_direction(layer)]
    if not layers:
        raise SteerdeskError("Nothing to export: a GGUF control vector has no slot for block 0, and the set has "
                             "no direction for any other layer.")

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        writer.add_string("controlvector.model_hint", hint)
        writer.add_int32("controlvector.layer_count", vs.num_layers - 1)
        # steerdesk's own fields, so a round trip keeps what llama.cpp does not need.
        writer.add_string("steerdesk.metadata", json.dumps(vs.metadata))
        writer.add_array("steerdesk.norms", [float(x) for x in vs.norms.tolist()])
        for layer in layers:
            writer.add_tensor(f"direction.{layer}",
                              np.ascontiguousarray(vs.directions[layer].float().numpy(), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write_with(path, write)
    return layers


def _model_hint(metadata: dict[str, str]) -> str:
    arch = metadata.get("architecture", "")
    for suffix in ("ForCausalLM", "LMHeadModel"):
        if arch.endswith(suffix):
            arch = arch[: -len(suffix)]
    return arch.lower() or metadata.get("model", "unknown")


def _field_str(field: Any) -> str:
    return bytes(field.parts[field.data[0]]).decode("utf-8")


MAX_LAYERS = 4096  # far above any model's depth; a GGUF claiming more is damaged


def import_gguf(path: str | Path, num_layers: int | None = None) -> VectorSet:
    """Read a llama.cpp / repeng control vector: ``direction.N`` -> steerdesk layer N.

    Layer 0 (and any layer without a tensor) is marked absent (``present[L]`` False; its row of
    ``directions`` is zero but is never used for steering). A damaged file raises
    ``SteerdeskError`` whatever part of it is damaged.
    """
    path = Path(path)
    try:
        return _import_gguf(path, num_layers)
    except SteerdeskError:
        raise
    except Exception as exc:  # gguf-py trusts the file: bad strings, offsets, shapes surface anywhere
        raise SteerdeskError(f"{path}: damaged GGUF control vector ({type(exc).__name__}: {str(exc)[:100]}).") \
            from None


# Sizes of GGUF scalar value types (gguf spec: GGUFValueType), 8 = string, 9 = array.
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def check_gguf_header(data: bytes) -> None:
    """Walk a GGUF file's key/value header and raise ``SteerdeskError`` when a count or length claims
    more bytes than the file has. gguf-py's reader trusts those counts and loops over every claimed
    array element (past the end of the file too): a damaged file claiming 2^40 elements exhausted
    memory in the fuzz tests. Source of the layout: the GGUF specification (ggml docs/gguf.md)."""
    size = len(data)
    if size < 24 or data[:4] != b"GGUF":
        raise SteerdeskError("not a GGUF file")
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    if n_tensors > size or n_kv > size:
        raise SteerdeskError("the header claims more entries than the file has bytes")
    pos = 24

    def take(n: int) -> int:
        nonlocal pos
        if n < 0 or pos + n > size:
            raise SteerdeskError("the header runs past the end of the file")
        start = pos
        pos += n
        return start

    def string() -> None:
        (length,) = struct.unpack_from("<Q", data, take(8))
        take(length)

    def value(vtype: int) -> None:
        if vtype in _GGUF_SCALAR:
            take(_GGUF_SCALAR[vtype])
        elif vtype == 8:
            string()
        elif vtype == 9:
            itype, count = struct.unpack_from("<IQ", data, take(12))
            if count > size - pos:  # every element takes at least one byte
                raise SteerdeskError(f"an array claims {count} elements in a {size}-byte file")
            if itype in _GGUF_SCALAR:
                take(_GGUF_SCALAR[itype] * count)
            else:
                for _ in range(count):
                    value(itype)
        else:
            raise SteerdeskError(f"unknown GGUF value type {vtype}")

    for _ in range(n_kv):
        string()
        (vtype,) = struct.unpack_from("<I", data, take(4))
        value(vtype)


def _import_gguf(path: Path, num_layers: int | None) -> VectorSet:
    import gguf

    try:
        check_gguf_header(path.read_bytes())
    except (SteerdeskError, struct.error) as exc:
        raise SteerdeskError(f"{path}: damaged GGUF control vector ({exc}).") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError, struct/numpy errors on damaged files
        raise SteerdeskError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {str(exc)[:120]}).") from None
    fields = reader.fields
    arch = _field_str(fields["general.architecture"]) if "general.architecture" in fields else ""
    if arch != "controlvector":
        raise SteerdeskError(f"{path}: a GGUF file of architecture {arch or 'unknown'!r}, not a control vector.")
    dirs: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        name = t.name
        if not name.startswith("direction."):
            raise SteerdeskError(f"{path}: unexpected tensor {name!r} in a control vector.")
        try:
            idx = int(name.split(".", 1)[1])
        except ValueError:
            raise SteerdeskError(f"{path}: cannot read the layer of tensor {name!r}.") from None
        if idx < 1:
            raise SteerdeskError(f"{path}: tensor {name!r} has layer index {idx}; llama.cpp numbers layers from 1.")
        if t.tensor_type.name != "F32" or len(t.shape) != 1:
            raise SteerdeskError(f"{path}: tensor {name!r} must be a 1-D float32 vector.")
        data = np.array(t.data, dtype=np.float32).reshape(-1)
        dirs[idx] = dirs.get(idx, 0) + data  # llama.cpp sums duplicates
    if not dirs:
        raise SteerdeskError(f"{path}: the control vector has no direction tensors.")
    sizes = {v.shape[0] for v in dirs.values()}
    if len(sizes) != 1:
        raise SteerdeskError(f"{path}: direction tensors have different sizes {sorted(sizes)}.")
    hidden = sizes.pop()
    metadata: dict[str, str] = {}
    if "steerdesk.metadata" in fields:
        try:
            metadata = {str(k): str(v) for k, v in json.loads(_field_str(fields["steerdesk.metadata"])).items()}
        except (ValueError, AttributeError):
            metadata = {}
    if num_layers is None:
        layer_count = None
        if "controlvector.layer_count" in fields:
            f = fields["controlvector.layer_count"]
            layer_count = int(f.parts[f.data[0]][0])
        meta_layers = metadata.get("num_layers")
        num_layers = int(meta_layers) if meta_layers and meta_layers.isdigit() else \
            max(max(dirs) + 1, (layer_count or 0) + 1)
    # The layer count comes from the file; a damaged one must not allocate gigabytes of zeros.
    if not 1 <= num_layers <= MAX_LAYERS or max(dirs) > MAX_LAYERS:
        raise SteerdeskError(f"{path}: the control vector claims {max(num_layers, max(dirs) + 1)} layers; "
                             f"no model has more than {MAX_LAYERS} (damaged file?).")
    directions = torch.zeros((num_layers, hidden), dtype=torch.float32)
    present = torch.zeros(num_layers, dtype=torch.bool)  # layers without a tensor are absent, not zero
    for idx, v in dirs.items():
        if idx < num_layers:
            directions[idx] = torch.from_numpy(v)
            present[idx] = True
    norms = torch.full((num_layers,), float("nan"))
    if "steerdesk.norms" in fields:
        f = fields["steerdesk.norms"]
        values = [float(f.parts[i][0]) for i in f.data]
        if len(values) == num_layers:
            norms = torch.tensor(values, dtype=torch.float32)
    hint = _field_str(fields["controlvector.model_hint"]) if "controlvector.model_hint" in fields else ""
    metadata.setdefault("model", hint or "unknown")
    metadata.update({"format": FORMAT, "num_layers": str(num_layers), "hidden_size": str(hidden),
                     "layer_convention": "block_output", "source_format": "gguf"})
    metadata.setdefault("method", "unknown")
    metadata.setdefault("read_position", "unknown")
    return _validate_loaded(VectorSet(directions=directions, norms=norms, metadata=metadata, present=present), path)


def describe(vs: VectorSet) -> str:
    """A short human summary of a vector set."""
    m = vs.metadata
    return (f"{m.get('method', '?')} vectors for {m.get('model', '?')} ({vs.num_layers} layers x "
            f"{vs.hidden_size}), read at {m.get('read_position', '?')} token, "
            f"dataset {m.get('dataset_name', '?')}")
