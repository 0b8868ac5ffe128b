"""What several panels need before they submit a job: a model, a vector set, held-out pairs.

Each check raises :class:`Refused` with the dialog title and sentence the window shows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ...core.errors import SteerdeskError
from ..vector_sets import NamedVectors, VectorSets


class PairsSource(Protocol):
    """Where the contrast pairs come from (the dataset panel)."""

    def dataset(self) -> Any:
        """All rows (a ``Dataset``)."""

    def heldout_fraction(self) -> float:
        """The held-out fraction of the deterministic split."""

    def train_and_heldout(self) -> tuple[Any, Any]:
        """``(train, held-out)`` after validation (``SteerdeskError`` with a sentence)."""

    def display_name(self) -> str:
        """The dataset's name as shown."""


class Refused(SteerdeskError):
    """A job cannot start yet: ``title`` names what is missing, the message says what to do."""

    def __init__(self, title: str, message: str) -> None:
        super().__init__(message)
        self.title = title


def need_model(controller: Any) -> Any:
    """The loaded model's ``ModelInfo`` (``Refused`` while none is loaded)."""
    info = controller.model_info if controller is not None else None
    if info is None:
        raise Refused("No model", "Wait for the model to load first.")
    return info


T = TypeVar("T")


def checked(controller: Any, build: Callable[[], T], title: str) -> T:
    """``build()`` once a model is loaded: :class:`Refused` without a model, or with ``title`` and
    the sentence of the ``SteerdeskError`` the panel's Spec builder raised."""
    need_model(controller)
    try:
        return build()
    except Refused:
        raise
    except SteerdeskError as exc:
        raise Refused(title, str(exc)) from None


def need_vectors(vector_sets: VectorSets) -> NamedVectors:
    """The usable set analysis jobs use (``Refused`` if there is none)."""
    item = vector_sets.for_analysis()
    if item is None:
        raise Refused("No vectors", "Compute or load a vector set for this model first.")
    return item


def need_heldout(pairs: PairsSource | None) -> Any:
    """The validated, non-empty held-out split of the dataset panel (``Refused`` otherwise)."""
    if pairs is None:
        raise Refused("Held-out pairs needed", "No dataset panel to take held-out pairs from.")
    try:
        _train, heldout = pairs.train_and_heldout()
        if len(heldout) == 0:
            raise SteerdeskError("The held-out split is empty: set 'Held out' above 0 in the Dataset panel.")
        heldout.validate()
    except SteerdeskError as exc:
        raise Refused("Held-out pairs needed", str(exc)) from None
    return heldout
