"""The generation pane's outputs: unsteered | steered text as it streams, and the layer x token heatmap."""

from __future__ import annotations

import html
import time
from typing import Any

import numpy as np
from PySide6.QtCore import QRectF, QTimer
from PySide6.QtGui import QColor, QPen
from PySide6.QtWidgets import (
    QApplication,
    QCheckBox,
    QGraphicsRectItem,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QSpinBox,
    QTextEdit,
    QWidget,
)

from ..widgets.heatmap import HeatmapView

HEAT_TITLE = "Projection on the steering direction (per token, / typical |h|)"
SHORT_TITLE = "Projection on v per token (/ typical |h|)"  # with a note: a long title would widen the plot


class GenerationOutput(QWidget):
    """Shows one generation: ``texts`` (the two text views) and ``heatmap`` are placed by the pane."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._num_layers = 0
        self._compare = True
        self._steered_row = 1
        self._steered: Any = None  # the NamedVectors the run steers with (None: unsteered only)
        self._steps: list[dict] = []
        self._results: list[Any] | None = None
        self._heat = np.zeros((1, 0), dtype=np.float32)
        self._levels = 0.05
        self._t0: float | None = None
        self._window: Any = None  # the steering's TokenWindow (None: unsteered)
        self._gated = False  # a condition gate decides whether the steered row is steered
        self._steered_cols: list[int] | None = None  # generated tokens steered in the shown row (None: not known)
        self._outline: Any = None
        self.stats = QLabel("")  # elapsed time and tokens/s, while and after a run
        self.stats.setObjectName("runStats")
        self.unsteered_view = QTextEdit()
        self.unsteered_view.setObjectName("unsteeredView")
        self.unsteered_view.setReadOnly(True)
        self.steered_view = QTextEdit()
        self.steered_view.setObjectName("steeredView")
        self.steered_view.setReadOnly(True)
        self.color_by = QCheckBox("Colour steered text by projection at layer")
        self.color_layer = QSpinBox()
        self.color_layer.setRange(0, 0)
        self.heatmap = HeatmapView(HEAT_TITLE, row_label="layer", col_label="generated token")
        self.heatmap.describe = self._describe_cell

        self.texts = QWidget()
        # The clock lives with the shown widgets (this object itself is never shown or parented):
        # it goes when the window goes, never ticking on a deleted label.
        self._clock = QTimer(self.texts)
        self._clock.setInterval(250)
        self._clock.timeout.connect(self._tick)
        ol = QGridLayout(self.texts)
        ol.setContentsMargins(0, 0, 0, 0)
        self.unsteered_label = QLabel("<b>Unsteered</b>")
        self.steered_label = QLabel("<b>Steered</b>")
        ol.addWidget(self.unsteered_label, 0, 0)
        ol.addWidget(self.steered_label, 0, 1)
        ol.addWidget(self.unsteered_view, 1, 0)
        ol.addWidget(self.steered_view, 1, 1)
        color_row = QHBoxLayout()
        color_row.addWidget(self.color_by)
        color_row.addWidget(self.color_layer)
        color_row.addStretch(1)
        ol.addLayout(color_row, 2, 1)
        ol.addWidget(self.stats, 2, 0)

        self.color_by.toggled.connect(self._render_steered)
        self.color_layer.valueChanged.connect(self._render_steered)

    def start(self, num_layers: int, compare: bool, steered_row: int, steered: Any, positions: str = "all",
              gated: bool = False) -> None:
        """Clear the outputs for a new run: ``steered`` (a ``NamedVectors`` or None) at batch row ``steered_row``,
        steering the token ``positions`` (a named position or a window, ``core.parsing.parse_positions``);
        ``gated``: a condition gate decides whether the row is steered."""
        from ...core.parsing import parse_positions

        self._gated = gated
        self._num_layers, self._compare, self._steered_row, self._steered = num_layers, compare, steered_row, steered
        self._window = parse_positions(positions) if steered is not None else None
        self._steered_cols = None
        self._mark_steered(None, "")
        self._steps = []
        self._results = None
        self.unsteered_view.clear()
        self.steered_view.clear()
        self._heat = np.zeros((max(self._num_layers, 1), 0), dtype=np.float32)
        self._levels = 0.05
        self.heatmap.set_data(np.full((max(self._num_layers, 1), 1), np.nan))
        self.unsteered_label.setText("<b>Unsteered</b>" if self._compare or self._steered_row == 0 else "")
        self.steered_label.setText("<b>Steered</b>" if steered is not None else "<b>—</b>")
        self.heatmap.clear_readout()  # no hover value left over from the last run
        self._t0 = time.perf_counter()
        self._clock.start()
        self._tick()

    def elapsed(self) -> float:
        """Seconds since the run started (0 before any)."""
        return 0.0 if self._t0 is None else time.perf_counter() - self._t0

    def _tick(self) -> None:
        """While running: the same quantities as the final line (tokens per row x rows, all rows' tokens/s)."""
        secs, n = self.elapsed(), len(self._steps)
        rows = 2 if self._compare else 1
        shown = f"{n} tokens x {rows} rows" if rows > 1 else f"{n} tokens"
        rate = f" · {shown} · {n * rows / secs:.1f} tokens/s" if n and secs > 0 else ""
        self.stats.setText(f"running · {secs:.1f} s{rate}")

    def _final_stats(self, results: list[Any], seconds: float | None, word: str) -> str:
        self._clock.stop()
        secs = seconds if seconds else self.elapsed()
        n = max((len(r.token_ids) for r in results), default=0)
        rows = f" x {len(results)} rows" if len(results) > 1 else ""
        rate = f" · {n * len(results) / secs:.1f} tokens/s" if secs > 0 else ""
        text = f"{word} · {n} tokens{rows} in {secs:.2f} s{rate}"
        self.stats.setText(text)
        return text

    def stop_clock(self, text: str = "failed") -> None:
        """The run ended without a result (failed): stop the clock, say so with the time it took."""
        self._clock.stop()
        self.stats.setText(f"{text} after {self.elapsed():.1f} s")

    def finish_stopped(self) -> str:
        """A stopped run: what streamed is its result, and every view of a finished run works on it
        (trimmed heatmap, hover, colour by projection). Returns the status line."""
        from ...core.generate import GenerationResult

        rows = max((len(st["ids"]) for st in self._steps), default=0)
        views = [self._view_for_row(r) for r in range(max(rows, 2 if self._compare else 1))]
        results = []
        for r, view in enumerate(views):
            ids = [st["ids"][r] for st in self._steps if r < len(st["ids"])]
            results.append(GenerationResult(text=view.toPlainText() if view is not None else "", token_ids=ids,
                                            finish_reason="stopped"))
        if self._steered_row >= len(results):
            self._clock.stop()
            self.stats.setText(f"stopped after {self.elapsed():.1f} s")
            return "Generation stopped."
        stats = self._final_stats(results, None, "stopped")
        self._show_final(results)
        return f"Generation stopped ({stats})."

    def append_text(self, row: int, chunk: str) -> None:
        """Streamed text for batch row ``row``."""
        view = self._view_for_row(row)
        if view is None:
            return
        cursor = view.textCursor()
        cursor.movePosition(cursor.MoveOperation.End)
        cursor.insertText(chunk)
        view.setTextCursor(cursor)

    def _view_for_row(self, row: int) -> QTextEdit | None:
        if self._compare:
            return self.unsteered_view if row == 0 else self.steered_view
        if self._steered is None:
            return self.unsteered_view
        return self.steered_view

    def add_steps(self, steps: list[dict]) -> None:
        """Coalesced generation steps: extend the live layer x token heatmap."""
        self._steps.extend(steps)
        cols = [st["proj"][self._steered_row] for st in steps if st.get("proj") is not None]
        if not cols:
            return
        s = self._steered
        norms = s.vectors.norms.numpy() if s is not None else np.ones(len(cols[0]))
        norms = np.where(np.isfinite(norms) & (norms > 0), norms, 1.0)
        block = np.stack(cols, 1) / norms[:, None]
        self._heat = np.concatenate([self._heat, block.astype(np.float32)], 1) \
            if self._heat.shape[0] == block.shape[0] else block.astype(np.float32)
        self._levels = max(self._levels, float(np.nanmax(np.abs(self._heat))) if self._heat.size else 0.05)
        self.heatmap.set_data(self._heat, levels=(-self._levels, self._levels))

    def finish(self, results: list[Any], seconds: float | None = None) -> str:
        """Final results: trim the heatmap to real tokens, render coloured text if asked; a status line.

        ``seconds`` (the run's own measurement) gives the time and tokens/s shown.
        """
        stats = self._final_stats(results, seconds, "done")
        n = self._show_final(results)
        reasons = {r.finish_reason for r in results}
        return f"Generated {n} tokens ({', '.join(sorted(reasons))}; {stats.removeprefix('done · ')})."

    def _show_final(self, results: list[Any]) -> int:
        self._results = results
        steered = results[self._steered_row]
        n = len(steered.token_ids)
        if self._heat.shape[1] > n:
            self._heat = self._heat[:, :n]
            self.heatmap.set_data(self._heat if n else np.full((self._heat.shape[0], 1), np.nan),
                                  levels=(-self._levels, self._levels))
        # The streamed text is authoritative only up to the last clean boundary; show the final text.
        for row, res in enumerate(results):
            view = self._view_for_row(row)
            if view is not None and view.toPlainText() != res.text:
                view.setPlainText(res.text)
        self._show_gate(results)
        self._show_window(steered, n)
        self._render_steered()
        return n

    def _show_gate(self, results: list[Any]) -> None:
        """Each row's gate state (open / closed and its score) next to its text's title."""
        for row, res in enumerate(results):
            view = self._view_for_row(row)
            if view is None or res.gate_score is None:
                continue
            label = self.unsteered_label if view is self.unsteered_view else self.steered_label
            title = "Unsteered" if view is self.unsteered_view else "Steered"
            state = "open" if res.gate_open else "closed"
            if view is self.steered_view:
                note = "" if res.gate_open else " (not steered)"
                label.setText(f"<b>{title}</b> · gate {state}, score {res.gate_score:+.4f}{note}")
            else:  # the comparison row is never steered: what the gate would have said
                label.setText(f"<b>{title}</b> · gate score {res.gate_score:+.4f} (would be {state})")

    def steered_columns(self) -> list[int] | None:
        """The generated tokens of the shown (steered) row whose producing pass was steered: the
        window's (``TokenWindow.steered_tokens``), none when the gate closed the row; None when not
        known (no steering, or a prompt window: it depends on the prompt's length in tokens)."""
        return None if self._steered_cols is None else list(self._steered_cols)

    def outlined(self) -> tuple[int, int] | None:
        """The first and last token column outlined on the heatmap, or None when nothing is outlined."""
        if self._outline is None:
            return None
        r = self._outline.rect()
        return int(r.left()), int(r.right()) - 1

    def _show_window(self, steered: Any, n: int) -> None:
        from ...core.errors import SteerdeskError

        w = self._window
        if w is None or self._steered is None:
            self._steered_cols = None
            return
        if steered.gate_open is False:
            self._steered_cols = []
            self._mark_steered([], "gate closed: none steered")
            return
        if self._gated and steered.gate_open is None:  # stopped before the result: the decision is unknown
            self._steered_cols = None
            self._mark_steered(None, "")
            return
        try:
            cols = w.steered_tokens(n)
        except SteerdeskError:  # a prompt window: only token 0 could be, and that depends on the prompt length
            self._steered_cols = None
            self._mark_steered(None, "prompt window (not marked)")
            return
        self._steered_cols = cols
        if w.kind == "all" and steered.gate_open is None:
            self._mark_steered(None, "")  # every token, no gate: the plain picture
            return
        self._mark_steered(cols, "outlined: steered tokens" if cols else "no token steered")

    def _mark_steered(self, cols: list[int] | None, note: str) -> None:
        """Outline the steered tokens' columns on the heatmap (they form one run) and say so in its title."""
        if self._outline is not None:
            self.heatmap.plot.removeItem(self._outline)
            self._outline = None
        self.heatmap.set_title(f"{SHORT_TITLE} · {note}" if note else HEAT_TITLE)
        if not cols:
            return
        rows = max(self._heat.shape[0], 1)
        item = QGraphicsRectItem(QRectF(cols[0], 0, cols[-1] + 1 - cols[0], rows))
        outline = QPen(QColor(230, 126, 34))
        outline.setWidth(3)
        outline.setCosmetic(True)
        item.setPen(outline)
        item.setZValue(10)
        self.heatmap.plot.addItem(item)
        self._outline = item

    def _token_texts(self) -> list[str]:
        row = self._steered_row
        n = len(self._results[row].token_ids) if self._results else len(self._steps)
        return [st["texts"][row] for st in self._steps][:n]

    def _render_steered(self, *_: Any) -> None:
        if not self._results or self._steered is None:
            return
        res = self._results[self._steered_row]
        if not self.color_by.isChecked() or self._heat.shape[1] == 0:
            self.steered_view.setPlainText(res.text)
            return
        layer = min(self.color_layer.value(), self._heat.shape[0] - 1)
        values = self._heat[layer]
        m = float(np.nanmax(np.abs(values))) or 1.0
        spans = []
        for text, v in zip(self._token_texts(), values):
            t = float(v) / m if np.isfinite(v) else 0.0
            color = QColor(214, 96, 77, int(180 * t)) if t > 0 else QColor(67, 147, 195, int(-180 * t))
            rgba = f"rgba({color.red()},{color.green()},{color.blue()},{color.alpha()})"
            spans.append(f'<span style="background-color:{rgba}" title="{float(v):.3g}">'
                         f"{html.escape(text).replace(chr(10), '<br>')}</span>")
        self.steered_view.setHtml("".join(spans))

    def _describe_cell(self, row: int, col: int, value: float) -> str:
        texts = [st["texts"][self._steered_row] for st in self._steps]
        token = repr(texts[col]) if col < len(texts) else "?"
        cols = self._steered_cols
        steered = "" if cols is None else (" (steered)" if col in cols else " (not steered)")
        return f"token {col} {token}{steered}, layer {row}: {value:+.3f} of typical |h|"

    def copy_text(self) -> None:
        """Copy both outputs to the clipboard."""
        text = f"--- unsteered ---\n{self.unsteered_view.toPlainText()}\n\n--- steered ---\n" \
               f"{self.steered_view.toPlainText()}"
        QApplication.clipboard().setText(text)
