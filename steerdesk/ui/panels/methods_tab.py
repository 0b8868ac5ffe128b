"""Analysis tab: mean-diff vs PCA vs optimized vs prompting on the held-out pairs (issue 17, item 3).

The computation is :func:`steerdesk.core.method_compare.compare_methods` (the ``compare`` job), the
same one ``steerdesk inspect --compare`` prints; this tab only builds the Spec and shows the result.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from .inputs import PairsSource, Refused, need_heldout, need_model

__all__ = ["MethodsTab"]

COLUMNS = ["method", "margin", "fluency", "layer", "scale", "ratio"]
TIPS = ["vector method, the analysis set, or the prompt baseline",
        "best held-out margin delta within the fluency budget (nats/token)",
        "fluency delta of that cell (nats/token)", "layer of the best cell", "scale of the best cell",
        "this margin / mean-diff's best margin"]


class MethodsTab(QWidget):
    """Inputs (layers, scales, budget, instruction, optimisation epochs), Compare, and the result table."""

    run_requested = Signal()
    """The user pressed Compare methods (the analysis panel submits the job)."""

    def __init__(self) -> None:
        super().__init__()
        from ...core.defaults import FLUENCY_BUDGET
        from ...core.optimize_settings import OptimizeSettings

        self.layers = QLineEdit("")
        self.layers.setObjectName("methodsLayers")
        self.layers.setPlaceholderText("layers compared, e.g. 12,15")
        self.scales = QLineEdit("0.25,0.5,0.75,1,1.5,2,3")
        self.budget = QDoubleSpinBox()
        self.budget.setRange(0.0, 100.0)
        self.budget.setDecimals(2)
        self.budget.setSingleStep(0.1)
        self.budget.setValue(FLUENCY_BUDGET)
        self.budget.setSuffix(" nats/token")
        self.instruction = QLineEdit("Reply rudely.")
        self.instruction.setPlaceholderText("system-message instruction of the prompt baseline (empty: none)")
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 200)
        self.epochs.setValue(OptimizeSettings().epochs)
        self.run_button = QPushButton("Compare methods")
        self.run_button.setObjectName("methodsButton")
        self.status = QLabel("Each method is computed from the training pairs and swept over the same layers x "
                             "scales on the held-out pairs; the best margin delta whose fluency loss stays within "
                             "the budget is shown (nats per token), beside the instruction as a prompt.")
        self.status.setWordWrap(True)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setObjectName("methodsTable")
        self.table.setHorizontalHeaderLabels(COLUMNS)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for c, tip in enumerate(TIPS):
            self.table.horizontalHeaderItem(c).setToolTip(tip)
        self.table.verticalHeader().setVisible(False)
        self.verdict = QLabel("")
        self.verdict.setWordWrap(True)
        self.verdict.setObjectName("methodsVerdict")
        form = QFormLayout()
        form.addRow("Layers", self.layers)
        form.addRow("Scales", self.scales)
        form.addRow("Fluency budget", self.budget)
        form.addRow("Prompt baseline", self.instruction)
        form.addRow("Optimized: epochs", self.epochs)
        row = QHBoxLayout()
        row.addWidget(self.run_button)
        row.addWidget(self.status, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(row)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.verdict)
        self.run_button.clicked.connect(self.run_requested)
        self.result: Any = None

    def build_spec(self, controller: Any, pairs: PairsSource | None, extra: Any = None) -> Any:
        """The ``CompareSpec`` of the fields on the dataset panel's split (``Refused`` with a sentence).

        ``extra``: the analysis vector set (a ``NamedVectors``) shown as its own row, or None.
        """
        from dataclasses import replace

        from ...core.errors import SteerdeskError
        from ...core.method_compare import METHODS
        from ...core.optimize_settings import OptimizeSettings
        from ...core.parsing import parse_layers, parse_scales
        from ...jobs import CompareSpec

        info = need_model(controller)
        need_heldout(pairs)
        assert pairs is not None
        try:
            if not self.layers.text().strip():
                raise SteerdeskError("Give the layers to compare the methods over (e.g. 12,15).")
            layers = parse_layers(self.layers.text(), info.num_layers)
            scales = parse_scales(self.scales.text())
            settings = replace(OptimizeSettings(), epochs=self.epochs.value())
        except SteerdeskError as exc:
            raise Refused("Cannot compare the methods", str(exc)) from None
        rows = ((extra.name, extra.vectors),) if extra is not None else ()
        return CompareSpec(dataset=pairs.dataset(), layers=tuple(layers), scales=tuple(scales),
                           heldout=pairs.heldout_fraction(), budget=self.budget.value(),
                           instruction=self.instruction.text().strip() or None, methods=METHODS, extra=rows,
                           optimize=settings)

    def set_progress(self, done: int, total: int, message: str) -> None:
        """Show how far the comparison is."""
        self.status.setText(f"{message}: {done} of {total} stages done…" if total else message)

    def show_epoch(self, report: Any) -> None:
        """Show the optimisation's latest curve point (an ``EpochReport``; anything else is ignored)."""
        from ...core.optimize_settings import EpochReport

        if isinstance(report, EpochReport):
            self.status.setText(f"Optimizing layer {report.layer}: epoch {report.epoch}, validation loss "
                                f"{report.val_loss:.4f}")

    def show_result(self, cmp: Any) -> None:
        """Render a ``MethodComparison``: one row per method, the prompt last, the winner in bold."""
        self.result = cmp
        winner = cmp.winner()
        rows: list[list[str]] = []
        names: list[str] = []
        for m in cmp.methods:
            ratio = cmp.ratio(m.method) if any(x.method == "mean-diff" for x in cmp.methods) else None
            if m.best_margin is None:
                rows.append([m.method, "none within budget", "", "", "", ""])
            else:
                rows.append([m.method, f"{m.best_margin:+.3f}", f"{m.best_fluency:+.3f}", str(m.best_layer),
                             f"{m.best_scale:g}", "" if ratio is None else f"{ratio:.2f}x"])
            names.append(m.method)
        if cmp.prompt is not None:
            p = cmp.prompt
            md = next((m.best_margin for m in cmp.methods if m.method == "mean-diff"), None)
            ratio = f"{p.margin_delta / md:.2f}x" if md and md > 0 else ""
            rows.append(["prompt", f"{p.margin_delta:+.3f}", f"{p.fluency_delta:+.3f}", "-", "-",
                         ratio if p.within_budget else f"{ratio} (outside budget)".strip()])
            names.append("prompt")
        self.table.setRowCount(len(rows))
        bold = QFont()
        bold.setBold(True)
        for r, (cells, name) in enumerate(zip(rows, names)):
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
                if c == 0:
                    item.setToolTip(f"prompt baseline: {cmp.prompt.instruction!r} as system message"
                                    if name == "prompt" and cmp.prompt is not None else cells[0])
                if name == winner:
                    item.setFont(bold)
                self.table.setItem(r, c, item)
        where = (f"layers {','.join(map(str, cmp.layers))} x scales {','.join(f'{s:g}' for s in cmp.scales)}, "
                 f"{cmp.train_pairs} training / {cmp.heldout_pairs} held-out pairs, budget {cmp.budget:g}")
        self.verdict.setText(f"<b>Best within the budget: {winner}</b> ({where})." if winner
                             else f"No method stays within the budget ({where}).")
        self.status.setText("Done.")
