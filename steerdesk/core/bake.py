"""Bake ``add`` steering into a standalone Hugging Face checkpoint (issue 14).

Why this is exact. Steering ``add`` at block ``L`` on all positions adds the same vector
``c = sum(scale * u)`` (over the steers at ``L``) to the residual stream after block ``L``
(``hidden_states[L + 1]``, conventions in :mod:`steerdesk.core.steering`). Every decoder block
handled here ends with ``h + ... + W x + b`` where ``W x + b`` is the block's *last residual
writer* (the MLP down-projection; with a parallel residual, GPT-NeoX / phi-2, any writer would do)
whose output joins the stream with no norm after it and is read by nothing inside the block. (The
attention output projection would not do in a sequential block: the block's own MLP reads it.)
Replacing ``b`` by ``b + c`` therefore adds ``c`` to the block's output at every position, which
is what the hook does; later blocks read the same stream in both models. Several steers at
several layers compose: each changes only its own block's bias.

Slots, per family (``model_type`` of the source config):

* ``llama`` (SmolLM2 included): ``mlp.down_proj.bias``, switched on with ``mlp_bias=True`` (the
  gate / up biases this also creates are zero);
* ``gpt2``: ``mlp.c_proj.bias``; ``gpt_neox``: ``mlp.dense_4h_to_h.bias`` (with the parallel
  residual the MLP output still joins the stream once); ``phi`` (phi-2 style): ``mlp.fc2.bias``;
* families without a bias slot are **re-expressed** as Llama when both compute the same function:
  ``mistral`` (``mlp_bias``), ``qwen2`` (``attention_bias=True`` carries its q/k/v biases; the
  ``o_proj`` bias this also creates stays zero, ``mlp_bias`` holds ``c``), ``phi3`` (fused
  ``qkv_proj`` split into q/k/v in that order, ``gate_up_proj`` split into gate (first half) and
  up (second half), ``mlp_bias``). A
  sliding attention window that Llama cannot express leaves the bake exact only for sequences up
  to the window's length: that limit is written in the metadata and returned.

Refused, with the reason: ``project`` and ``clamp`` (they depend on ``h . v^`` at each position,
which no weight can carry; the naive fold into every writer up to block ``L`` also changes what
blocks ``0..L`` read through their norms -- ``tests/core/test_bake_refusals.py`` shows the
difference), positions other than ``all``, per-row steering, Gemma 2 / Gemma 3 (a norm after each
writer), any other family, quantised models, and a recipe of scale-0 steers only (a no-op).

Every bake is checked before anything is written: the baked model (built in memory, sharing the
source's tensors) and the hooked source model run on the same token ids; in float32 a logit
difference above ``1e-3 * (1 + max |logit|)`` refuses the bake (it would be a bug here).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .bake_build import build_baked_model
from .bake_plan import (
    CHECK_TEXT,
    CONFIG_KEY,
    FORMAT,
    SIDECAR,
    BakePlan,
    BakeResult,
    ProgressFn,
    check_settings,
    fold_addends,
    model_type,
    plan_bake,
    window_limit,
)
from .errors import Cancelled, SteerdeskError
from .fileio import current_umask
from .models import LoadedModel
from .steering import Steer

__all__ = ["CHECK_TEXT", "CONFIG_KEY", "FORMAT", "SIDECAR", "BakePlan", "BakeResult", "ProgressFn", "bake",
           "bake_metadata", "build_baked_model", "check_ids", "check_out_dir", "check_settings", "compare_logits",
           "file_sha256", "fold_addends", "model_type", "plan_bake", "window_limit"]


def check_ids(lm: LoadedModel, length: int = 24) -> torch.Tensor:
    """``[1, length]`` token ids of :data:`CHECK_TEXT` (repeated as needed), on the input device."""
    ids = lm.tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"]
    while len(ids) < length:
        ids = ids + ids
    return torch.tensor([ids[:length]], device=lm.input_device)


def compare_logits(lm: LoadedModel, steers: Sequence[Steer], baked: Any, ids: torch.Tensor) -> tuple[float, float]:
    """``(max |baked - hooked| logit difference, max |hooked logit|)`` on ``ids`` ``[1, S]``."""
    from .steering import Steering

    with torch.inference_mode():
        with Steering(lm, list(steers)):
            want = lm.model(input_ids=ids).logits.float()
        got = baked(input_ids=ids.to(baked.get_input_embeddings().weight.device)).logits.float()
    diff = float((got.to(want.device) - want).abs().amax())
    return diff, float(want.abs().amax())


# ================================================================================ metadata

def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bake_metadata(lm: LoadedModel, steers: Sequence[Steer], plan: BakePlan, *, vectors: Any = None,
                  vector_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What the checkpoint records about its making (JSON-ready): format, source model, vector
    identity (``directions_sha256`` as in records and sweeps, plus the file's SHA-256), the
    steers (layer, scale, mode, normalize, positions), the target family, slot and limits."""
    from .. import __version__
    from .identity import model_identity, vector_identity

    vec: dict[str, Any] = {}
    if vectors is not None:
        vec = vector_identity(vectors, str(vector_path) if vector_path is not None else None)
    elif vector_path is not None:
        vec = {"path": str(vector_path)}
    if vector_path is not None and Path(vector_path).is_file():
        vec["file_sha256"] = file_sha256(vector_path)
    first = steers[0]
    return {
        "format": FORMAT,
        "steerdesk_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {**model_identity(lm), "model_type": plan.source_model_type, "path": lm.info.source},
        "vector": vec,
        "steers": [{"layer": int(s.layer), "scale": float(s.scale), "mode": s.mode, "normalize": bool(s.normalize),
                    "positions": s.positions} for s in steers],
        "layers": list(plan.layers),
        "scale": float(first.scale),
        "mode": first.mode,
        "normalize": bool(first.normalize),
        "target_model_type": plan.target_model_type,
        "re_expressed": plan.re_expressed,
        "bias_slot": plan.slot,
        "exact_up_to_tokens": plan.max_tokens,
        "notes": list(plan.notes),
    }


# ================================================================================ writing

def check_out_dir(out_dir: str | os.PathLike[str], force: bool = False, source: str | None = None,
                  inputs: Sequence[str | os.PathLike[str] | None] = ()) -> Path:
    """The output folder as a ``Path``, after refusing what a bake must not write to.

    Raises ``SteerdeskError`` when it exists (unless ``force``), is a file or a link, its parent
    folder is missing, or it is, holds or lies in ``source`` (the folder the model was loaded from).
    ``force`` replaces only an earlier bake (a folder holding ``steerdesk_bake.json``) or an empty
    folder, never the working folder or one above it: anything else could be a user's own files;
    nor a folder holding one of ``inputs`` (the vector file the bake reads, say).
    """
    out = Path(out_dir).expanduser()
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise SteerdeskError(f"{out} exists and is not a folder: choose another output folder.")
        if not force:
            raise SteerdeskError(f"{out} already exists: choose another folder, or pass --force to replace it.")
        here = Path.cwd().resolve()
        if out.resolve() == here or out.resolve() in here.parents:
            raise SteerdeskError(f"Cannot bake into {out}: it is the working folder or holds it; choose a new folder.")
        for source_file in inputs:
            if source_file is not None and out.resolve() in Path(source_file).expanduser().resolve().parents:
                raise SteerdeskError(f"Cannot replace {out}: it holds {source_file}, which this bake reads. Move the "
                                     f"file or choose another folder.")
        if not (out / SIDECAR).is_file() and any(out.iterdir()):
            raise SteerdeskError(f"{out} holds files that are not a steerdesk bake: --force replaces only an earlier "
                                 f"bake (a folder with {SIDECAR}) or an empty folder. Choose a new folder.")
    parent = out.parent
    if not parent.is_dir():
        raise SteerdeskError(f"Cannot bake into {out}: the folder {parent} does not exist.")
    src = Path(source).resolve() if source else None
    if src is not None and src.exists():
        target = out.resolve()
        if target == src or src in target.parents or target in src.parents:
            raise SteerdeskError(f"Cannot bake into {out}: it is (or holds) the folder the model was loaded from.")
    return out


def _legacy_rope_keys(config_file: Path) -> None:
    """Add the pre-transformers-5 RoPE keys (``rope_theta``, ``rope_scaling``) next to ``rope_parameters``.

    transformers 5 writes only ``rope_parameters``; readers built for transformers 4 (older vLLM,
    transformers 4 itself) would silently fall back to their default theta (10000) without
    ``rope_theta``. transformers 5 reads the legacy keys back into the same ``rope_parameters``.
    """
    config = json.loads(config_file.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return
    config.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in config:
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write(baked: Any, lm: LoadedModel, tmp: Path, metadata: dict[str, Any]) -> None:
    """Fill the temporary folder ``tmp``; the folder and its files get the permissions any new
    folder or file would (``mkdtemp`` made the folder 0700, writers may make 0600 files), so a
    server running as another user can read the checkpoint."""
    baked.config.steerdesk_bake = metadata
    baked.save_pretrained(tmp)
    _legacy_rope_keys(tmp / "config.json")
    lm.tokenizer.save_pretrained(tmp)
    if not (tmp / "generation_config.json").is_file():
        baked.generation_config.save_pretrained(tmp)
    (tmp / SIDECAR).write_text(json.dumps(metadata, indent=1) + "\n", encoding="utf-8")
    umask = current_umask()
    for f in [tmp, *tmp.rglob("*")]:  # flush before the rename makes the folder visible
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        elif f.is_dir():
            os.chmod(f, 0o777 & ~umask)


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed after."""
    if not out.exists():
        os.rename(tmp, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(aside)
    os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def bake(
    lm: LoadedModel,
    steers: Sequence[Steer],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    vectors: Any = None,
    vector_path: str | os.PathLike[str] | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> BakeResult:
    """Write ``lm`` with ``steers`` folded into its weights as a Hugging Face checkpoint folder.

    ``steers``: a flat list of ``add`` steers on positions ``all`` (see :func:`plan_bake` for
    what is refused). ``out_dir`` gets ``model.safetensors`` (or shards), ``config.json`` (with a
    ``steerdesk_bake`` entry), the tokenizer files, ``generation_config.json`` and
    ``steerdesk_bake.json`` (the same metadata); ``AutoModelForCausalLM.from_pretrained(out_dir)``
    loads it without steerdesk and without remote code. ``vectors`` / ``vector_path`` identify
    the vector set in the metadata. The folder is written beside ``out_dir`` under a temporary
    name and renamed at the end: a failure (disk full, cancel) leaves nothing behind. An existing
    ``out_dir`` is refused unless ``force`` (then replaced whole). ``progress(done, total, msg)``
    is called per step; ``cancel`` is checked between steps.

    Raises ``SteerdeskError`` (one line) for anything that cannot be baked exactly, an existing
    folder, a float32 self-check that fails, or a write error; :class:`Cancelled` when cancelled.
    """
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser()
    steps = 4

    def step(i: int, msg: str) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("Stopped.")
        if progress is not None:
            progress(i, steps, msg)

    if vectors is not None:
        vectors.check_compatible(lm.info)
    check_out_dir(out, force, lm.info.source, inputs=(vector_path,))
    step(0, "Planning the bake")
    plan = plan_bake(lm, steers)
    kept = [s for s in steers if not s.is_identity]
    step(1, "Folding the steering into the weights")
    baked = build_baked_model(lm, plan)
    step(2, "Checking the baked model against the hooked one")
    diff, scale = compare_logits(lm, kept, baked, check_ids(lm, min(24, plan.max_tokens or 24)))  # within the limit
    if lm.model.dtype in (torch.float32, torch.float64) and not diff <= 1e-3 * (1.0 + scale):
        raise SteerdeskError(f"The baked model does not reproduce the steered one (max logit difference {diff:.3g}, "
                             f"logits up to {scale:.3g}); nothing was written. This is a steerdesk bug.")
    metadata = bake_metadata(lm, kept, plan, vectors=vectors, vector_path=vector_path)
    metadata["check"] = {"max_logit_diff": diff, "logit_scale": scale,
                         "dtype": str(lm.model.dtype).replace("torch.", "")}
    step(3, f"Writing {out}")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.bake-", dir=out.parent))
    except OSError as exc:
        raise SteerdeskError(f"Cannot write the baked checkpoint to {out}: {exc.strerror or exc}") from None
    try:
        _write(baked, lm, tmp, metadata)
        if cancel is not None and cancel.is_set():
            raise Cancelled("Stopped.")
        _replace_folder(tmp, out)
    except OSError as exc:
        why = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise SteerdeskError(f"Cannot write the baked checkpoint to {out}: {why}; nothing was written.") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if progress is not None:
        progress(steps, steps, f"Baked into {out}")
    return BakeResult(out_dir=out, plan=plan, metadata=metadata, max_logit_diff=diff, logit_scale=scale,
                      seconds=time.perf_counter() - t0)
