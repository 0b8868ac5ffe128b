"""The one home of the session's vector sets: a small model the panels observe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QObject, Signal


@dataclass
class NamedVectors:
    """A vector set held in the session, and whether it fits the loaded model."""

    name: str
    vectors: Any  # steerdesk.core.vectors.VectorSet (imported lazily: the window starts without torch)
    usable: bool = True
    reason: str = ""


class VectorSets(QObject):
    """Named vector sets, each checked against the loaded model.

    Two choices are kept here so no panel reads another: ``selected`` (the Vectors panel's list)
    and ``steering`` (the set the generation pane steers with). Analysis jobs use
    :meth:`for_analysis`: the steering set, else the selected one.
    """

    changed = Signal()
    """Sets were added, removed or re-checked against a model."""
    selected_changed = Signal(str)
    """The Vectors panel selected the set of this name ("" for none)."""
    steering_changed = Signal(str)
    """The generation pane now steers with the set of this name ("" for unsteered)."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._sets: list[NamedVectors] = []
        self._model_info: Any = None
        self._selected = ""
        self._steering = ""

    # -- reading -----------------------------------------------------------------------
    def sets(self) -> list[NamedVectors]:
        """All sets, oldest first."""
        return list(self._sets)

    def find(self, name: str) -> NamedVectors | None:
        """The set called ``name``, or None."""
        return next((s for s in self._sets if s.name == name), None)

    def model_info(self) -> Any:
        """The ``ModelInfo`` the sets are checked against (None while no model is loaded)."""
        return self._model_info

    def selected(self) -> NamedVectors | None:
        """The set selected in the Vectors panel (usable or not)."""
        return self.find(self._selected)

    def steering(self) -> NamedVectors | None:
        """The usable set the generation pane steers with, or None."""
        item = self.find(self._steering)
        return item if item is not None and item.usable else None

    def for_analysis(self) -> NamedVectors | None:
        """The usable set analysis jobs use: the steering set, else the selected one."""
        item = self.steering() or self.selected()
        return item if item is not None and item.usable else None

    # -- changing ----------------------------------------------------------------------
    def unique_name(self, name: str | None) -> str:
        """``name`` (or "vectors"), numbered " (2)", " (3)" ... if taken."""
        base = name or "vectors"
        candidate, n = base, 2
        while self.find(candidate) is not None:
            candidate = f"{base} ({n})"
            n += 1
        return candidate

    def add(self, vs: Any, name: str | None = None) -> NamedVectors:
        """Hold ``vs`` under a unique name (stored in its metadata), checked against the model."""
        name = self.unique_name(name or vs.metadata.get("name") or vs.metadata.get("dataset_name") or "vectors")
        vs.metadata["name"] = name
        item = NamedVectors(name, vs)
        self._check(item)
        self._sets.append(item)
        self.changed.emit()
        return item

    def remove(self, name: str) -> None:
        """Drop the set called ``name`` (nothing if there is none)."""
        before = len(self._sets)
        self._sets = [s for s in self._sets if s.name != name]
        if len(self._sets) != before:
            self.changed.emit()

    def set_model_info(self, info: Any) -> None:
        """Re-check every set against the model now loaded (None while loading)."""
        self._model_info = info
        for item in self._sets:
            self._check(item)
        self.changed.emit()

    def select(self, name: str) -> None:
        """The Vectors panel selected ``name``; observers (the generation pane) follow."""
        self._selected = name
        self.selected_changed.emit(name)

    def set_steering(self, name: str) -> None:
        """The generation pane now steers with ``name`` ("" for unsteered)."""
        if name != self._steering:
            self._steering = name
            self.steering_changed.emit(name)

    def _check(self, item: NamedVectors) -> None:
        from ..core.errors import SteerdeskError

        if self._model_info is None:
            item.usable, item.reason = False, "no model loaded"
            return
        try:
            item.vectors.check_compatible(self._model_info)
            item.usable, item.reason = True, ""
        except SteerdeskError as exc:
            item.usable, item.reason = False, str(exc)
