"""Reading hidden states at decoder-block outputs and turning them into steering vectors."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import torch

from .datasets import Dataset, format_pair, uses_chat_template
from .errors import Cancelled, SteerdeskError
from .memory import oom_guard
from .models import LoadedModel
from .steering import block_hidden

if TYPE_CHECKING:  # vectors imports nothing from here; only the annotation needs the name
    from .vectors import VectorSet

log = logging.getLogger(__name__)

METHODS = ("mean-diff", "pca")
#: Every vector method steerdesk has: ``optimized`` (issue 17) trains chosen layers, in core/optimize.py.
ALL_METHODS = METHODS + ("optimized",)
READS = ("last", "mean")

Progress = Callable[[int, int], None]


@dataclass
class Encoded:
    """Token ids of one formatted example and where its reply starts."""

    ids: list[int]
    reply_start: int
    truncated: bool = False


def context_limit(lm: LoadedModel) -> int | None:
    """The longest sequence the model takes (``max_position_embeddings``), or None if unknown."""
    config = lm.model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode(lm: LoadedModel, pairs: Sequence[tuple[str, str]], system: str | None = None) -> list[Encoded]:
    """Format ``(prompt, reply)`` pairs with the chat template and tokenize them.

    Texts longer than the model's context are cut from the left (the reply end is what
    is read) and a warning is logged.
    """
    tok = lm.tokenizer
    special = not uses_chat_template(tok)
    limit = context_limit(lm)
    out = []
    n_truncated = 0
    for prompt, reply in pairs:
        prefix, full = format_pair(tok, prompt, reply, system)
        ids = tok(full, add_special_tokens=special)["input_ids"]
        pre = tok(prefix, add_special_tokens=special)["input_ids"] if prefix else []
        start = 0
        for a, b in zip(ids, pre):  # longest common prefix: robust to merges at the seam
            if a != b:
                break
            start += 1
        if not ids:
            raise SteerdeskError(f"An example tokenizes to nothing: {reply[:40]!r}.")
        start = min(start, len(ids) - 1)
        truncated = False
        if limit and len(ids) > limit:
            cut = len(ids) - limit
            ids = ids[cut:]
            start = max(0, start - cut)
            truncated = True
            n_truncated += 1
        out.append(Encoded(ids, start, truncated))
    if n_truncated:
        log.warning("%d example(s) longer than the model's context (%s tokens) were cut from the left.",
                    n_truncated, limit)
    return out


def _pad_batch(items: Sequence[Encoded], pad_id: int, side: str, read: str,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, position_ids and read weights ``[B, S]`` for one batch."""
    width = max(len(e.ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    weights = torch.zeros((len(items), width), dtype=torch.float32)
    for i, e in enumerate(items):
        n = len(e.ids)
        off = width - n if side == "left" else 0
        ids[i, off:off + n] = torch.tensor(e.ids)
        mask[i, off:off + n] = 1
        if read == "last":
            weights[i, off + n - 1] = 1.0
        else:
            lo = off + e.reply_start
            weights[i, lo:off + n] = 1.0 / (n - e.reply_start)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids.to(device), mask.to(device), positions.to(device), weights.to(device)


def forward_with_positions(model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                           **kwargs: Any) -> Any:
    """Forward pass with explicit position ids (left padding needs them); falls back if unsupported."""
    try:
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
    except TypeError as exc:
        if "position_ids" not in str(exc):
            raise
        return model(input_ids=ids, attention_mask=mask, **kwargs)


def _stack_on_cpu(parts: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-layer results along dim 1 (on the first part's device) and copy once."""
    dev = parts[0].device
    return torch.stack([p.to(dev) for p in parts], 1).cpu()


@torch.inference_mode()
def collect(
    lm: LoadedModel,
    encoded: Sequence[Encoded],
    *,
    read: str = "last",
    batch_size: int = 8,
    padding_side: str = "left",
    layers: Sequence[int] | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states at the read position(s) of every block output.

    Returns ``(reads [N, L, H], token_norms [N, L])`` in float32 on the CPU, in the order
    of ``encoded``. ``token_norms`` is the mean ``|h|`` over the read tokens. Batches are
    sorted by length (longest first, so memory trouble shows at once) and masked.
    """
    if read not in READS:
        raise SteerdeskError(f"Unknown read position {read!r}; use last or mean.")
    if batch_size < 1:
        raise SteerdeskError("Batch size must be at least 1.")
    total = lm.info.num_layers
    if layers is None:
        layers = list(range(total))
    else:
        bad = [layer for layer in layers if not -total <= layer < total]
        if bad:
            raise SteerdeskError(f"Layer {bad[0]} does not exist: the model has layers 0-{total - 1}.")
        layers = [layer % total for layer in layers]
    n, hidden = len(encoded), lm.info.hidden_size
    reads = torch.zeros((n, len(layers), hidden), dtype=torch.float32)
    norms = torch.zeros((n, len(layers)), dtype=torch.float32)
    if not layers or not n:
        return reads, norms
    order = sorted(range(n), key=lambda i: -len(encoded[i].ids))
    pad_id = lm.tokenizer.pad_token_id
    device = lm.input_device
    state: dict[str, Any] = {}
    last_layer = max(layers)

    class _Done(Exception):
        pass

    def make_hook(j: int, layer: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            lo, hi = state["window"]
            h = block_hidden(output)[:, lo:hi]
            w = state["weights"].get(h.device)
            if w is None:  # first block on this device (device_map="auto" spreads blocks)
                w = state["weights"][h.device] = next(iter(state["weights"].values())).to(h.device)
            # Zero what is not read: a pad position may hold inf/NaN, and 0 * NaN is NaN.
            hf = torch.where((w > 0).unsqueeze(-1), h.float(), 0.0)
            state["reads"][j] = torch.einsum("bs,bsh->bh", w, hf)
            state["norms"][j] = torch.einsum("bs,bs->b", w, hf.norm(dim=-1))
            if layer == last_layer:
                raise _Done  # nothing above this block is needed
        return hook

    handles = [lm.blocks[layer].register_forward_hook(make_hook(j, layer)) for j, layer in enumerate(layers)]
    base = getattr(lm.model, "base_model", lm.model) or lm.model
    try:
        done = 0
        for start in range(0, n, batch_size):
            if cancel is not None and cancel.is_set():
                raise Cancelled("Extraction cancelled.")
            idx = order[start:start + batch_size]
            ids, mask, positions, weights = _pad_batch([encoded[i] for i in idx], pad_id, padding_side,
                                                       read, device)
            cols = weights.any(0).nonzero()  # the columns any row reads: one for left-padded "last"
            state["window"] = (int(cols[0]), int(cols[-1]) + 1)
            state["weights"] = {weights.device: weights[:, state["window"][0]:state["window"][1]]}
            state["reads"], state["norms"] = {}, {}
            try:
                with oom_guard("extracting activations", f"try a batch size below {batch_size}."):
                    forward_with_positions(base, ids, mask, positions, use_cache=False)
            except _Done:
                pass
            # One copy to the CPU per batch, not one per layer (each would wait for the device).
            reads[idx] = _stack_on_cpu([state["reads"][j] for j in range(len(layers))])
            norms[idx] = _stack_on_cpu([state["norms"][j] for j in range(len(layers))])
            done += len(idx)
            if progress is not None:
                progress(done, n)
    finally:
        for h in handles:
            h.remove()
    return reads, norms


def _direction_pca(diffs: torch.Tensor) -> torch.Tensor:
    """First principal axis of paired differences ``[N, H]`` (uncentred), signed and scaled.

    The sign makes the mean difference project positively (target side positive); the
    length is that mean projection, so scales are comparable with mean-difference vectors.
    """
    if diffs.shape[0] == 1:
        return diffs[0].clone()
    _, _, vh = torch.linalg.svd(diffs.double(), full_matrices=False)
    axis = vh[0]
    proj = diffs.double() @ axis
    if proj.mean() < 0:
        axis, proj = -axis, -proj
    return (axis * proj.mean()).float()


@dataclass
class Extraction:
    """Raw per-example reads behind a vector set (for diagnostics)."""

    base: torch.Tensor  # [Nb, L, H]
    target: torch.Tensor  # [Nt, L, H]


def compute_vectors(
    lm: LoadedModel,
    dataset: Dataset,
    *,
    method: str = "mean-diff",
    read: str = "last",
    batch_size: int = 8,
    system: str | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    keep_reads: bool = False,
) -> VectorSet:
    """Compute a :class:`~steerdesk.core.vectors.VectorSet` from a contrast dataset.

    ``mean-diff``: ``v_L = mean(h_target) - mean(h_base)``. ``pca``: first principal axis
    of the paired differences. Also records the typical activation norm of each layer and
    each example's projection on the layer's unit direction.
    """
    from .. import __version__
    from .vectors import VectorSet

    if method == "optimized":
        raise SteerdeskError("The optimized method trains chosen layers: use core.optimize.optimize_vectors "
                             "(steerdesk compute --method optimized --layers L).")
    if method not in METHODS:
        raise SteerdeskError(f"Unknown method {method!r}; use mean-diff or pca.")
    dataset.validate()
    if method == "pca" and not dataset.paired:
        raise SteerdeskError("PCA needs paired examples; this dataset's base and target lists differ in length.")
    base_pairs, target_pairs = dataset.base_texts, dataset.target_texts
    encoded = encode(lm, list(base_pairs) + list(target_pairs), system)
    n_truncated = sum(e.truncated for e in encoded)
    reads, norms = collect(lm, encoded, read=read, batch_size=batch_size, progress=progress, cancel=cancel)
    nb = len(base_pairs)
    base, target = reads[:nb], reads[nb:]
    if method == "mean-diff":
        directions = target.mean(0) - base.mean(0)
    else:
        diffs = target - base
        directions = torch.stack([_direction_pca(diffs[:, layer]) for layer in range(diffs.shape[1])])
    typical = norms.mean(0)
    unit = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    proj_base = torch.einsum("nlh,lh->ln", base, unit)
    proj_target = torch.einsum("nlh,lh->ln", target, unit)
    info = lm.info
    metadata = {
        "format": "steerdesk.vectors/1",
        "model": info.name,
        "architecture": info.architecture,
        "num_layers": str(info.num_layers),
        "hidden_size": str(info.hidden_size),
        "method": method,
        "read_position": read,
        "layer_convention": "block_output",
        "dataset_sha256": dataset.sha256(),
        "dataset_name": dataset.name,
        "num_examples": str(len(dataset)),
        "truncated_examples": str(n_truncated),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "steerdesk_version": __version__,
    }
    vs = VectorSet(directions=directions.contiguous(), norms=typical.contiguous(), metadata=metadata,
                   proj_base=proj_base.contiguous(), proj_target=proj_target.contiguous())
    if keep_reads:
        vs.extraction = Extraction(base=base, target=target)
    return vs
