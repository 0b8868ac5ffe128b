"""One parser for what users type: layer lists, scale lists and named layer sets (CLI and panels).

Every function raises :class:`~steerdesk.core.errors.SteerdeskError` with a one-line message
for text it cannot read, and the layer-range check and its message live here only
(:func:`check_layers`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import SteerdeskError

__all__ = ["POSITION_NAMES", "TokenWindow", "check_layers", "format_ranges", "parse_layers", "parse_positions",
           "parse_scales", "parse_sets"]

#: The named steering positions (``core.steering``); windows are written ``first:N``, ``gen:A-B``,
#: ``gen:A-`` or ``prompt:A-B`` (:func:`parse_positions`).
POSITION_NAMES = ("all", "prompt", "generated")


def check_layers(layers: Iterable[int], num_layers: int, *, of: str = "model") -> None:
    """Raise ``SteerdeskError`` for the first layer outside ``0..num_layers-1``.

    ``of`` names what has the layers in the message: ``"model"`` ("the model has layers 0-29")
    or ``"vectors"`` ("the vectors cover layers 0-29").
    """
    for layer in layers:
        if not 0 <= layer < num_layers:
            where = "the vectors cover" if of == "vectors" else "the model has"
            raise SteerdeskError(f"Layer {layer} is out of range: {where} layers 0-{num_layers - 1}.")


def parse_layers(text: str, num_layers: int | None = None) -> list[int]:
    """Parse ``"12,15"``, ``"10-14"`` or a mix like ``"3,10-12"`` into sorted unique layer indices.

    With ``num_layers`` every layer must be in ``0..num_layers-1`` (:func:`check_layers`).
    Raises ``SteerdeskError`` for unreadable text, a backwards range or an empty list.
    """
    layers: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise SteerdeskError(f"Layer range {part!r} is backwards.")
                layers.extend(range(lo, hi + 1))
            else:
                layers.append(int(part))
        except ValueError:
            raise SteerdeskError(f"Cannot read layers {text!r}: use a list like 12,15 or a range like 10-14.") from None
    if not layers:
        raise SteerdeskError("No layers given.")
    if num_layers is not None:
        check_layers(layers, num_layers)
    return sorted(dict.fromkeys(layers))


def parse_scales(text: str) -> list[float]:
    """``"0,0.5,1,2"`` (negative values too) -> finite floats, order kept, duplicates dropped.

    Raises ``SteerdeskError`` for unreadable text, no value, or a value that is not finite.
    """
    try:
        values = [float(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise SteerdeskError(f"Cannot read scales {text!r}: use a list like 0,0.5,1,2.") from None
    if not values:
        raise SteerdeskError("No scales given.")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise SteerdeskError(f"Scale {bad[0]} is not a finite number.")
    return list(dict.fromkeys(values))


def parse_sets(text: str, num_layers: int | None = None) -> dict[str, list[int]]:
    """``"early=4-8;mid=12,15"`` -> ``{"early": [4, 5, 6, 7, 8], "mid": [12, 15]}`` (text order).

    Each set's layers are read by :func:`parse_layers` (range-checked with ``num_layers``).
    Raises ``SteerdeskError`` for a part without ``=`` or without a name. Empty text: ``{}``.
    """
    out: dict[str, list[int]] = {}
    for part in str(text).split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise SteerdeskError(f"Cannot read layer set {part!r}: use NAME=LAYERS, e.g. mid=12-15.")
        name, layers = part.split("=", 1)
        name = name.strip()
        if not name:
            raise SteerdeskError(f"Layer set {part!r} has no name.")
        out[name] = parse_layers(layers, num_layers)
    return out


def format_ranges(layers: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"`` (sorted, duplicates dropped)."""
    runs: list[list[int]] = []
    for layer in sorted(set(layers)):
        if runs and runs[-1][1] == layer - 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)



@dataclass(frozen=True)
class TokenWindow:
    """Which token positions a steer acts on, read from a positions string (:func:`parse_positions`).

    ``kind`` is ``"all"``, ``"prompt"``, ``"generated"`` (the named positions), ``"gen"`` (a window
    of generated tokens) or ``"prompt_window"`` (a window of prompt tokens). ``start`` / ``stop``
    are inclusive token indices (0-based) of a window; ``stop`` None means "to the end".

    Boundary convention (docs/decisions.md, "Token windows"): generated token ``k`` is the k-th
    new token (``k = 0`` is the first token of the answer), and ``gen:A-B`` steers the forward
    passes that **produce** generated tokens A..B, i.e. the hidden states at the absolute positions
    ``P-1+A .. P-1+B`` (``P`` = padded prompt length; position ``P-1`` is the last prompt token, whose
    hidden state produces token 0). ``first:N`` is ``gen:0-(N-1)``: the first N tokens of the answer
    are all produced under steering. (The named ``generated`` steers positions ``>= P``, the passes
    that *process* generated tokens: the first token of the answer is produced unsteered.) Prompt
    token ``i`` of ``prompt:A-B`` is the i-th token of the row's formatted prompt (chat template
    included, left padding excluded), steered at its own position.
    """

    kind: str
    start: int = 0
    stop: int | None = None

    def steered_tokens(self, num_generated: int, prompt_length: int | None = None) -> list[int]:
        """Indices (0-based, ascending) of the generated tokens whose producing pass this window steers.

        Token k is produced by the hidden state at absolute position ``P-1+k`` (the boundary
        convention above), so: ``all`` every token; ``prompt`` token 0 only (position ``P-1`` is a
        prompt position); ``generated`` tokens 1..; ``gen:A-B`` tokens A..B (``gen:A-`` A..); a
        prompt window ``prompt:A-B`` token 0 only when it covers the row's last prompt token, i.e.
        ``A <= prompt_length-1 <= B`` (``prompt_length``: the row's formatted prompt in tokens,
        left padding excluded). Indices stop at ``num_generated - 1``. Raises ``SteerdeskError`` for
        a prompt window without ``prompt_length`` or a negative count.
        """
        n = int(num_generated)
        if n < 0:
            raise SteerdeskError(f"A generation cannot have {n} tokens.")
        if self.kind == "all":
            return list(range(n))
        if self.kind == "prompt":
            return [0] if n else []
        if self.kind == "generated":
            return list(range(1, n))
        if self.kind == "gen":
            last = n - 1 if self.stop is None else min(self.stop, n - 1)
            return list(range(self.start, last + 1))
        if prompt_length is None:
            raise SteerdeskError("Which answer tokens a prompt window steers depends on the prompt's length.")
        last_prompt = int(prompt_length) - 1
        hi = self.stop if self.stop is not None else last_prompt
        return [0] if n and self.start <= last_prompt <= hi else []


_WINDOW_HELP = ("use all, prompt, generated, first:N (the first N generated tokens), gen:A-B or gen:A- "
                "(generated tokens A to B, 0-based, inclusive), or prompt:A-B (prompt tokens A to B)")


def parse_positions(text: str) -> TokenWindow:
    """Read a steering positions string into a :class:`TokenWindow`.

    Accepted: ``all``, ``prompt``, ``generated``, ``first:N`` (N >= 1), ``gen:A-B``, ``gen:A-``
    and ``prompt:A-B`` (0 <= A <= B, inclusive, spaces ignored). Raises ``SteerdeskError`` with
    the accepted forms for anything else (a backwards or empty window included).
    """
    raw = str(text)
    t = raw.replace(" ", "").lower()
    if t in POSITION_NAMES:
        return TokenWindow(t)
    head, sep, rest = t.partition(":")
    if not sep or head not in ("first", "gen", "prompt") or not rest:
        raise SteerdeskError(f"Unknown positions {raw!r}; {_WINDOW_HELP}.")
    try:
        if head == "first":
            n = int(rest)
            if n < 1:
                raise SteerdeskError(f"Positions {raw!r}: first:N needs N >= 1.")
            return TokenWindow("gen", 0, n - 1)
        a, dash, b = rest.partition("-")
        if not dash:
            raise ValueError
        lo = int(a)
        hi = None if (b == "" and head == "gen") else int(b)
    except ValueError:
        raise SteerdeskError(f"Cannot read positions {raw!r}; {_WINDOW_HELP}.") from None
    if lo < 0 or (hi is not None and hi < lo):
        raise SteerdeskError(f"Positions {raw!r}: the window must satisfy 0 <= A <= B.")
    return TokenWindow("gen" if head == "gen" else "prompt_window", lo, hi)
