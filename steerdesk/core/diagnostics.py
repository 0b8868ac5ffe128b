"""Vector diagnostics: is there a direction at this layer, and does the vector point along it?

Per layer, from the hidden states at the read position of a contrast set's base and target
replies (ideally held-out pairs):

* **separation** of the base and target projections on the layer's unit direction: ROC-AUC
  (probability that a target projects above a base; ties count half) and d'
  (mean gap over the pooled standard deviation);
* **consistency** of the paired differences: mean cosine of each pair's difference to the mean
  difference (1 = every pair moves the same way; paired sets only);
* **alignment**: cosine of this set's mean difference to the vector (1 when the set is the one
  the vector came from and the method is mean-diff);
* **relative norm**: ``|v_L|`` over the typical activation norm ``|h_L|`` at the read tokens;

and a layer x layer cosine matrix of the directions.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .datasets import Dataset
from .errors import SteerdeskError
from .models import LoadedModel
from .vectors import VectorSet

Progress = Callable[[int, int], None]


@dataclass
class Diagnostics:
    """Per-layer lists (index = layer) and the ``[layers][layers]`` cosine matrix.

    Values that cannot be computed (one example per side, zero vectors, unpaired data for
    consistency) are ``None``.
    """

    layers: list[int]
    auc: list[float | None]
    d_prime: list[float | None]
    consistency: list[float | None]
    alignment: list[float | None]
    vector_norm: list[float | None]
    typical_norm: list[float | None]
    relative_norm: list[float | None]
    cosine: list[list[float | None]]
    n_base: int
    n_target: int
    paired: bool
    read_position: str = "last"
    dataset_name: str = ""
    no_vector: list[int] = field(default_factory=list)  # layers the set has no direction for

    def to_dict(self) -> dict[str, Any]:
        """Every number as JSON-ready Python values (what ``inspect --json`` prints)."""
        return asdict(self)

    def best_layer(self) -> int | None:
        """The layer with the highest AUC (ties: higher d')."""
        scored = [(a, d if d is not None else -math.inf, layer)
                  for layer, a, d in zip(self.layers, self.auc, self.d_prime) if a is not None]
        return max(scored)[2] if scored else None

    def format_table(self) -> str:
        """A plain-text table, one line per layer (what ``steerdesk inspect`` prints)."""
        def f(x: float | None, spec: str) -> str:
            return "-" if x is None else format(x, spec)

        head = ("layer", "|v|/|h|", "AUC", "d'", "consist", "align", "cos(L-1)")
        widths = (5, 8, 6, 6, 7, 6, 8)
        lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
        absent = set(self.no_vector)
        for i, layer in enumerate(self.layers):
            if layer in absent:
                lines.append(f"{layer:>5}  {'no vector':>8}")
                continue
            prev = self.cosine[i][i - 1] if i > 0 else None
            lines.append(f"{layer:>5}  {f(self.relative_norm[i], '8.3f')}  {f(self.auc[i], '6.3f')}  "
                         f"{f(self.d_prime[i], '6.2f')}  {f(self.consistency[i], '7.3f')}  "
                         f"{f(self.alignment[i], '6.3f')}  {f(prev, '8.3f')}")
        best = self.best_layer()
        lines.append(f"{self.n_base} base / {self.n_target} target examples"
                     f"{' (paired)' if self.paired else ''}, read at the {self.read_position} token"
                     + (f"; best separation at layer {best}" if best is not None else ""))
        return "\n".join(lines)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def roc_auc(neg: torch.Tensor, pos: torch.Tensor) -> float:
    """P(pos > neg) + 0.5 P(pos == neg), exact (Mann-Whitney U / (n_pos n_neg))."""
    if neg.numel() == 0 or pos.numel() == 0:
        return math.nan
    diff = pos.double()[:, None] - neg.double()[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def d_prime(neg: torch.Tensor, pos: torch.Tensor) -> float:
    """(mean_pos - mean_neg) / sqrt((var_pos + var_neg) / 2) (unbiased variances)."""
    if neg.numel() < 2 or pos.numel() < 2:
        return math.nan
    pooled = math.sqrt(0.5 * (float(pos.double().var()) + float(neg.double().var())))
    gap = float(pos.double().mean() - neg.double().mean())
    if pooled == 0:
        return math.copysign(math.inf, gap) if gap else math.nan
    return gap / pooled


def cosine_matrix(directions: torch.Tensor) -> list[list[float | None]]:
    """``[L][L]`` cosines of the directions (``None`` involving a zero vector)."""
    d = directions.double()
    norms = d.norm(dim=-1)
    unit = d / norms.clamp_min(1e-300)[:, None]
    cos = unit @ unit.T
    zero = norms == 0
    return [[None if (zero[i] or zero[j]) else float(cos[i, j]) for j in range(d.shape[0])]
            for i in range(d.shape[0])]


def diagnose_reads(
    directions: torch.Tensor,
    base: torch.Tensor,
    target: torch.Tensor,
    *,
    paired: bool = True,
    token_norms: torch.Tensor | None = None,
    read_position: str = "last",
    dataset_name: str = "",
    present: Sequence[bool] | torch.Tensor | None = None,
) -> Diagnostics:
    """Diagnostics from reads: ``directions [L, H]``, ``base [Nb, L, H]``, ``target [Nt, L, H]``.

    ``token_norms`` (``[Nb + Nt, L]``, mean ``|h|`` over the read tokens) gives the typical
    norm; without it the norm of the reads is used (the same for ``read='last'``).
    ``present`` (``[L]`` bool, default: non-zero rows of ``directions``) marks the layers the set
    has a direction for; the others are listed in ``no_vector`` and every per-layer value of
    theirs is ``None`` (never 0: no direction is not a measured null).
    """
    if directions.ndim != 2:
        raise SteerdeskError("Directions must be a [layers, hidden] matrix.")
    n_layers = directions.shape[0]
    if base.ndim != 3 or target.ndim != 3 or base.shape[1:] != directions.shape or \
            target.shape[1:] != directions.shape:
        raise SteerdeskError(f"Reads of shape {tuple(base.shape)} / {tuple(target.shape)} do not match "
                             f"directions of shape {tuple(directions.shape)}.")
    paired = paired and base.shape[0] == target.shape[0]
    d = directions.double()
    vnorm = d.norm(dim=-1)
    unit = d / vnorm.clamp_min(1e-300)[:, None]
    pb = torch.einsum("nlh,lh->ln", base.double(), unit)  # [L, Nb]
    pt = torch.einsum("nlh,lh->ln", target.double(), unit)
    if token_norms is not None:
        typical = token_norms.double().mean(0)
    else:
        typical = torch.cat([base, target]).double().norm(dim=-1).mean(0)
    mean_diff = target.double().mean(0) - base.double().mean(0)  # [L, H]
    auc: list[float | None] = []
    dp: list[float | None] = []
    cons: list[float | None] = []
    align: list[float | None] = []
    rel: list[float | None] = []
    has = [bool(x) for x in (torch.as_tensor(present).reshape(-1) if present is not None else vnorm > 0)]
    if len(has) != n_layers:
        raise SteerdeskError(f"'present' has {len(has)} entries for {n_layers} layers.")
    has = [h and float(vnorm[i]) > 0 for i, h in enumerate(has)]
    for layer in range(n_layers):
        zero = not has[layer]
        auc.append(None if zero else _finite(roc_auc(pb[layer], pt[layer])))
        dp.append(None if zero else _finite(d_prime(pb[layer], pt[layer])))
        md = mean_diff[layer]
        if paired and float(md.norm()) > 0:
            diffs = target[:, layer].double() - base[:, layer].double()
            cos = torch.nn.functional.cosine_similarity(diffs, md[None, :].expand_as(diffs), dim=-1, eps=1e-300)
            cons.append(_finite(float(cos.mean())))
        else:
            cons.append(None)
        if zero or float(md.norm()) == 0:
            align.append(None)
        else:
            align.append(_finite(float(torch.dot(md, unit[layer]) / md.norm())))
        rel.append(None if zero else _finite(float(vnorm[layer] / typical[layer])) if float(typical[layer]) > 0
                   else None)
    cosine = cosine_matrix(directions)
    for i in range(n_layers):
        for j in range(n_layers):
            if not (has[i] and has[j]):
                cosine[i][j] = None
    return Diagnostics(
        layers=list(range(n_layers)), auc=auc, d_prime=dp, consistency=cons, alignment=align,
        vector_norm=[float(x) if has[i] else None for i, x in enumerate(vnorm.tolist())],
        typical_norm=[_finite(float(x)) for x in typical],
        relative_norm=rel, cosine=cosine, n_base=int(base.shape[0]),
        n_target=int(target.shape[0]), paired=paired, read_position=read_position, dataset_name=dataset_name,
        no_vector=[i for i in range(n_layers) if not has[i]],
    )


def diagnose_extraction(vs: VectorSet) -> Diagnostics:
    """Diagnostics on the examples a vector set was computed from (``compute_vectors(keep_reads=True)``)."""
    ext = getattr(vs, "extraction", None)
    if ext is None:
        raise SteerdeskError("These vectors carry no reads: compute them with keep_reads=True, or give a dataset.")
    meta = getattr(vs, "metadata", {}) or {}
    return diagnose_reads(vs.directions, ext.base, ext.target, paired=ext.base.shape[0] == ext.target.shape[0],
                          read_position=meta.get("read_position", "last"),
                          dataset_name=meta.get("dataset_name", ""), present=getattr(vs, "present", None))


def diagnose(
    lm: LoadedModel,
    vs: VectorSet,
    dataset: Dataset,
    *,
    read: str | None = None,
    system: str | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> Diagnostics:
    """Read ``dataset`` through the model and diagnose ``vs`` on it (held-out pairs recommended).

    ``read`` defaults to the vector set's read position (``last`` if unknown).
    """
    from .extract import READS, collect, encode

    vs.check_compatible(lm.info)
    meta = getattr(vs, "metadata", {}) or {}
    if read is None:
        read = meta.get("read_position", "last")
        if read not in READS:
            read = "last"
    dataset.validate()
    base_pairs: Sequence[tuple[str, str]] = dataset.base_texts
    target_pairs: Sequence[tuple[str, str]] = dataset.target_texts
    encoded = encode(lm, list(base_pairs) + list(target_pairs), system)
    reads, norms = collect(lm, encoded, read=read, batch_size=batch_size, progress=progress, cancel=cancel)
    nb = len(base_pairs)
    return diagnose_reads(vs.directions, reads[:nb], reads[nb:], paired=dataset.paired and nb == len(target_pairs),
                          token_norms=norms, read_position=read, dataset_name=dataset.name,
                          present=getattr(vs, "present", None))


__all__ = ["Diagnostics", "diagnose", "diagnose_reads", "diagnose_extraction", "roc_auc", "d_prime",
           "cosine_matrix"]
