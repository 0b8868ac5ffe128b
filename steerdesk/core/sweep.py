"""Scored layer x scale sweeps: where does a vector steer, and at what cost in fluency.

Every cell (a layer, or a named set of layers, times a scale) is scored on the same held-out
texts as :func:`steerdesk.core.evaluate.evaluate` would score it alone (to float rounding):
margin and fluency deltas versus unsteered, and optionally KL on neutral texts.

What makes a sweep cheap:

* **per-row steering**: one forward pass carries several configurations, one batch row per
  (configuration, text);
* **prefix reuse**: a configuration whose first steered layer is L leaves blocks 0..L untouched
  (steering adds to block L's output), so their output is the unsteered one. One unsteered forward
  per text batch records the output of every block that starts a configuration (and the arguments
  the model passes to each block: mask, rotary embeddings, position ids); each configuration then
  steers the recorded output of block L and runs only blocks L+1..end, followed by the final norm
  and the LM head. This works for any model whose blocks are called with batch-first tensors; a
  self-check against the model's own forward (first batch) falls back to full forward passes where
  it does not (``result.path == "full"``).

* **packing** (on top of prefix reuse): a pair's two replies share their prompt tokens and the
  texts of a row share the chat template's system prefix, kept apart by a custom 4D attention mask
  (:func:`steerdesk.core.evaluate.make_packed_layouts`); used only after the packed unsteered scores
  matched the model's own unpacked ones (``result.packed``). Steering every position, rows are flat
  (each pair's prompt right before its replies, no padding to align reply columns), and the pairs
  are spread over the row count that leaves the fewest padded token slots. A reply's last token is
  left out of its row (scored from the column before it, its own column is no one's query or key).
* **reused buffers**: the ``[tokens, vocab]`` tensors of the scoring tail (LM head, log-softmax,
  KL terms) are written into buffers kept for the whole sweep
  (:class:`~steerdesk.core.evaluate.Workspace`): on a CPU a fresh one is new zeroed pages.

Token windows (``positions`` ``first:N``, ``gen:A-B``, ``gen:A-``, ``prompt:A-B``) mean what they
mean in generation: reply token k of a held-out text is produced by the hidden state one position
before it, so ``gen:A-B`` steers the hidden states at the columns ``reply_col - 1 + A .. reply_col - 1 + B``
(``first:1`` steers the last prompt position only), and ``prompt:A-B`` counts the text's own prompt
tokens (chat template included, padding excluded). Windows run on unpacked layouts.

A condition ``gate`` (:class:`~steerdesk.core.condition.ConditionGate`) is decided once per pair from
its unsteered prompt, as :func:`~steerdesk.core.generate.generate` decides it per row (one batched
:func:`~steerdesk.core.condition.gate_scores` call for the sweep's distinct prompts); the replies of a
pair whose gate stays closed are scored unsteered in every cell (delta exactly 0). KL on neutral
texts is not gated: it measures what steering costs wherever it fires (the neutral texts have no
prompt for the gate to read).

Cells where steering is the identity (``add`` or ``project`` at scale 0) are not computed: their
delta is exactly 0. Rows whose layer(s) the vector set has no direction for (a GGUF control vector
has no block 0) are not computed either: their cells are null and the row is marked ``no_vector``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import torch

from .datasets import Dataset
from .errors import SteerdeskError
from .evaluate import Scores, json_float
from .heatmap import NO_VECTOR_BG, NO_VECTOR_HATCH, NO_VECTOR_LABEL, heatmap_png
from .identity import directions_of, model_identity, vector_identity
from .layouts import EvalTexts, prepare_texts
from .models import LoadedModel
from .parsing import check_layers, parse_positions
from .steering import MODES, Steer
from .sweep_engine import CACHE_BUDGET_BYTES, CPU_FORWARD_TOKENS, Cell, Sweeper, is_identity
from .sweep_result import DEFAULT_BUDGET, DEFAULT_SCALES, FORMAT, SetRow, SweepResult, format_table, pick_best
from .vectors import VectorSet, layers_without_direction, rows_without_direction

if TYPE_CHECKING:
    from .condition import ConditionGate

#: ``on_cell(row, col, margin_delta, fluency_delta)``: row indexes ``layers`` then ``sets``.
CellCallback = Callable[[int, int, float, float], None]
Progress = Callable[[int, int], None]


def sweep(
    lm: LoadedModel,
    vectors: VectorSet | torch.Tensor,
    heldout: Dataset,
    *,
    layers: Sequence[int] | None = None,
    scales: Sequence[float] = DEFAULT_SCALES,
    sets: Mapping[str, Sequence[int]] | None = None,
    mode: str = "add",
    normalize: bool = False,
    positions: str = "all",
    fluency_budget: float = DEFAULT_BUDGET,
    neutral: Sequence[str] | None = None,
    system: str | None = None,
    max_pairs: int | None = None,
    batch_size: int = 16,
    max_rows: int = 64,
    prefix_reuse: bool = True,
    pack: bool = True,
    cache_budget: int = CACHE_BUDGET_BYTES,
    vector_path: str | None = None,
    on_cell: CellCallback | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    gate: ConditionGate | None = None,
) -> SweepResult:
    """Score every (layer or layer set) x scale cell on held-out pairs; see the module docstring.

    ``vectors`` is a :class:`~steerdesk.core.vectors.VectorSet` (or a ``[layers, hidden]`` tensor).
    ``layers`` defaults to every layer. ``sets`` adds named multi-layer rows (``{"mid": [12, 15]}``),
    each steered with its layers' own vectors at the cell's scale. ``on_cell(row, col, margin_delta,
    fluency_delta)`` is called as each cell is done (rows: ``layers`` first, then ``sets``; identity
    cells first). ``progress(done, total)`` counts forward passes; ``cancel`` is checked before each
    and raises :class:`~steerdesk.core.errors.Cancelled`. ``positions`` is a named position or a
    token window (module docstring); ``gate`` steers only the pairs whose prompt opens it (module
    docstring; ``result.gate`` holds the per-prompt scores and decisions). Raises ``SteerdeskError``
    for bad settings (unreadable positions, a gate that does not fit the model, ...).
    """
    from .. import __version__

    t0 = time.perf_counter()
    directions = directions_of(vectors)
    info = lm.info
    if directions.shape[1] != info.hidden_size:
        raise SteerdeskError(f"The vectors have hidden size {directions.shape[1]}, the model {info.hidden_size}.")
    if mode not in MODES:
        raise SteerdeskError(f"Unknown steering mode {mode!r}; use one of {', '.join(MODES)}.")
    positions = str(positions).replace(" ", "")
    parse_positions(positions)  # a named position or a token window; raises with the accepted forms
    if gate is not None:
        gate.check(lm)
    if not (isinstance(fluency_budget, (int, float)) and math.isfinite(fluency_budget) and fluency_budget >= 0):
        raise SteerdeskError("The fluency budget must be a number >= 0.")
    n_vec = directions.shape[0]
    layer_list = list(range(min(n_vec, info.num_layers))) if layers is None else [int(x) for x in layers]
    layer_list = list(dict.fromkeys(layer_list))
    scale_list = [float(s) for s in scales]
    if not scale_list:
        raise SteerdeskError("No scales given.")
    set_items = [(str(k), sorted(dict.fromkeys(int(x) for x in v))) for k, v in (sets or {}).items()]
    if not layer_list and not set_items:
        raise SteerdeskError("No layers given.")
    for s_name, s_layers in set_items:
        if not s_layers:
            raise SteerdeskError(f"Layer set {s_name!r} is empty.")
    every_layer = layer_list + [x for _, ls in set_items for x in ls]
    check_layers(every_layer, info.num_layers)
    check_layers(every_layer, n_vec, of="vectors")

    cells: list[Cell] = []
    row_layers = [[layer] for layer in layer_list] + [ls for _, ls in set_items]
    missing = rows_without_direction(vectors, row_layers)
    if all(missing):
        gone = sorted({x for m in missing for x in m})
        raise SteerdeskError(f"The vectors have no direction for layer{'s' if len(gone) > 1 else ''} "
                             f"{', '.join(map(str, gone))}: nothing to sweep (choose layers the set covers).")
    for r, ls in enumerate(row_layers):
        if missing[r]:
            continue  # "no vector": not evaluated, null cells (never a measured 0)
        for c, scale in enumerate(scale_list):
            steers = [Steer(layer=x, vector=directions[x], scale=scale, mode=mode, normalize=normalize,
                            positions=positions) for x in ls]
            for s in steers:
                s.check(info.num_layers, info.hidden_size)
            cells.append(Cell(r, c, steers, start=min(ls), identity=is_identity(steers), index=len(cells)))

    texts = prepare_texts(lm, heldout, neutral=neutral, system=system, max_pairs=max_pairs)
    open_texts, gate_info = gate_texts(lm, texts, gate, system) if gate is not None else (None, None)
    n_rows, n_cols = len(row_layers), len(scale_list)
    margin = [[math.nan] * n_cols for _ in range(n_rows)]
    fluency = [[math.nan] * n_cols for _ in range(n_rows)]
    kl = [[math.nan] * n_cols for _ in range(n_rows)]
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], max(sweeper.total, done[0]))

    def cell_done(cell: Cell, scores: Scores, base: Scores) -> None:
        m, f = scores.margin - base.margin, scores.fluency - base.fluency
        margin[cell.row][cell.col] = m
        fluency[cell.row][cell.col] = f
        kl[cell.row][cell.col] = scores.kl if scores.kl is not None else math.nan
        if on_cell is not None:
            on_cell(cell.row, cell.col, m, f)

    sweeper = Sweeper(lm, texts, cells, batch_size=batch_size, max_rows=max_rows, prefix_reuse=prefix_reuse,
                       cache_budget=cache_budget, cancel=cancel, on_cell=cell_done, progress=tick, pack=pack,
                       open_texts=open_texts)
    baseline = sweeper.run()

    to_json = lambda rows: [[json_float(x) for x in row] for row in rows]
    n_layers = len(layer_list)
    has_kl = texts.n_neutral > 0
    set_rows = [SetRow(name, ls, [json_float(x) for x in margin[n_layers + i]],
                       [json_float(x) for x in fluency[n_layers + i]],
                       [json_float(x) for x in kl[n_layers + i]] if has_kl else None,
                       no_vector=bool(missing[n_layers + i]))
                for i, (name, ls) in enumerate(set_items)]
    all_margin = to_json(margin)
    all_fluency = to_json(fluency)
    best_cell = pick_best(all_margin, all_fluency, float(fluency_budget))
    best = None
    if best_cell is not None:
        r, c = best_cell
        best = {"row": r, "col": c, "layer": layer_list[r] if r < n_layers else None,
                "set": set_items[r - n_layers][0] if r >= n_layers else None, "layers": row_layers[r],
                "scale": scale_list[c], "margin_delta": all_margin[r][c], "fluency_delta": all_fluency[r][c]}
    from_meta = getattr(vectors, "metadata", {}) or {}
    return SweepResult(
        layers=layer_list,
        scales=scale_list,
        margin_delta=all_margin[:n_layers],
        fluency_delta=all_fluency[:n_layers],
        kl=to_json(kl[:n_layers]) if has_kl else None,
        sets=set_rows,
        baseline={"margin": json_float(baseline.margin), "fluency": json_float(baseline.fluency)},
        fluency_budget=float(fluency_budget),
        best=best,
        settings={"mode": mode, "normalize": normalize, "positions": positions, "system": system,
                  "max_pairs": max_pairs, "batch_size": batch_size, "max_rows": max_rows,
                  "prefix_reuse": prefix_reuse, "pack": pack, "neutral_texts": list(neutral) if neutral else None,
                  "read_position": from_meta.get("read_position")},
        model=model_identity(lm),
        vector=vector_identity(vectors, vector_path),
        dataset={"name": texts.dataset_name, "sha256": texts.dataset_sha256, "n_pairs": texts.n_pairs,
                 "n_base": len(texts.indices("base")), "n_target": len(texts.indices("target")),
                 "n_neutral": texts.n_neutral},
        steerdesk_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - t0, 3),
        path=sweeper.path,
        packed=sweeper.path == "prefix" and sweeper.layouts is sweeper.packed,
        no_vector=[bool(m) for m in missing[:n_layers]],
        gate=gate_info,
    )


def gate_texts(lm: LoadedModel, texts: EvalTexts, gate: ConditionGate,
               system: str | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Decide ``gate`` once per distinct held-out prompt (unsteered, formatted as generation formats it).

    Returns ``open_texts`` (``[len(texts)]`` bool: the held-out replies whose prompt opens the gate;
    neutral texts always True, KL is not gated) and the result's ``gate`` entry: ``layer``,
    ``threshold``, ``side``, ``read``, ``kl`` (``"ungated"``), ``n_prompts``, ``n_open`` and per
    distinct prompt (dataset order) its ``scores`` (CAST cosine) and ``open`` flag.
    Raises ``SteerdeskError`` for a gate that does not fit the model or an empty prompt.
    """
    from .condition import gate_scores

    held = texts.indices("base", "target")
    prompts = list(dict.fromkeys(texts.prompts[i] for i in held))
    if any(not p.strip() for p in prompts):
        raise SteerdeskError("A condition gate reads each pair's prompt: the held-out set has an empty prompt.")
    scores = gate_scores(lm, prompts, gate, system=system)
    opened = gate.opens(scores)
    by_prompt = dict(zip(prompts, opened))
    open_texts = torch.tensor([k == "neutral" or by_prompt[p] for p, k in zip(texts.prompts, texts.kinds)])
    info = {"layer": int(gate.layer), "threshold": float(gate.threshold), "side": gate.side, "read": gate.read,
            "kl": "ungated", "n_prompts": len(prompts), "n_open": sum(opened),
            "scores": [json_float(float(x)) for x in scores], "open": opened}
    return open_texts, info


# Names other modules and the window import from here (the engine's result, PNG, parsers, identities).
__all__ = ["CACHE_BUDGET_BYTES", "CPU_FORWARD_TOKENS", "DEFAULT_BUDGET", "DEFAULT_SCALES", "FORMAT", "NO_VECTOR_BG",
           "NO_VECTOR_HATCH", "NO_VECTOR_LABEL", "SetRow", "SweepResult", "format_table", "heatmap_png",
           "layers_without_direction", "model_identity", "pick_best",
           "gate_texts", "rows_without_direction", "sweep", "vector_identity"]
