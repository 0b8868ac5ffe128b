"""The sweep heatmap as a PNG, written without an imaging library (zlib + a 3x5 pixel font).

Margin deltas on a diverging blue - grey - red scale (symmetric around 0), scales across, layers
(then layer sets) down; a row the vector set has no direction for is hatched and labelled
``NO VECTOR`` instead of coloured (nothing was measured there).
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Any

from .sweep_result import SweepResult

_COOL = (59, 76, 192)
_MID = (242, 242, 242)
_WARM = (180, 4, 38)

# 3x5 bitmap digits for axis labels (rows of 3 bits, top to bottom).
_GLYPHS = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 2, 2),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0),
    "#": (5, 7, 5, 7, 5), " ": (0, 0, 0, 0, 0),
    # letters for the "NO VECTOR" row label
    "N": (6, 5, 5, 5, 5), "O": (2, 5, 5, 5, 2), "V": (5, 5, 5, 5, 2), "E": (7, 4, 6, 4, 7),
    "C": (3, 4, 4, 4, 3), "T": (7, 2, 2, 2, 2), "R": (6, 5, 6, 5, 5),
    # and for the axis titles (LAYER, SCALE, MARGIN)
    "S": (3, 4, 2, 1, 6), "A": (2, 5, 7, 5, 5), "L": (4, 4, 4, 4, 7), "Y": (5, 5, 2, 2, 2),
    "M": (5, 7, 7, 5, 5), "G": (3, 4, 5, 5, 3), "I": (7, 2, 2, 2, 7),
}
#: Geometry of the PNG in pixels: cell size, the row-label column's width, the rows above the cells
#: (the SCALE title, then the scale values with the LAYER title over the row labels).
CELL_W, CELL_H, LABEL_W, TOP = 44, 18, 52, 30
NO_VECTOR_LABEL = "NO VECTOR"
#: Colours of a "no vector" row in the PNG: light background, dark hatching (not a value colour).
NO_VECTOR_BG = (236, 232, 220)
NO_VECTOR_HATCH = (90, 90, 90)


def diverging_rgb(x: float) -> tuple[int, int, int]:
    """Blue (-1) - light grey (0) - red (+1); clipped."""
    x = max(-1.0, min(1.0, x))
    end = _WARM if x > 0 else _COOL
    t = abs(x)
    return tuple(int(round(m + (e - m) * t)) for m, e in zip(_MID, end))  # type: ignore[return-value]


def png_bytes(pixels: Any) -> bytes:
    """A minimal RGB PNG from a ``[H, W, 3]`` uint8 numpy array."""
    import numpy as np

    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + np.ascontiguousarray(pixels[y]).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def draw_text(img: Any, x: int, y: int, s: str, scale: int = 2) -> None:
    """Draw ``s`` with the 3x5 digit font into ``img`` ``[H, W, 3]`` at ``(x, y)``, ``scale`` pixels per dot."""
    for ch in s:
        glyph = _GLYPHS.get(ch, _GLYPHS[" "])
        for gy, bits in enumerate(glyph):
            for gx in range(3):
                if bits & (4 >> gx):
                    img[y + gy * scale:y + (gy + 1) * scale, x + gx * scale:x + (gx + 1) * scale] = 30
        x += 4 * scale


def heatmap_png(result: SweepResult, path: str | Path, *, cell_w: int = CELL_W, cell_h: int = CELL_H) -> None:
    """Write the margin-delta heatmap as a PNG (no Qt): rows = layers (then sets), columns = scales,
    titled LAYER, SCALE and (over the colour bar) MARGIN.

    Diverging colours with symmetric limits (+-max |margin delta|, shown in the colour bar at the
    right); cells beyond the fluency budget are dimmed and hatched; the best cell is framed. Rows are
    labelled with their layer; named sets with ``#1``, ``#2``... in order. A row the vector set has no
    direction for is drawn as one beige band with dense dark hatching and the words ``NO VECTOR``
    (no value colour: it was not measured).
    """
    import numpy as np

    from .fileio import atomic_write_with

    rows = [result.cell(r, c) for r in range(result.n_rows) for c in range(len(result.scales))]
    finite = [abs(m) for m, _ in rows if m is not None and math.isfinite(m)]
    limit = max(finite) if finite and max(finite) > 0 else 1.0
    label_w, top = LABEL_W, TOP
    n_r, n_c = result.n_rows, len(result.scales)
    bar_x = max(label_w + n_c * cell_w, label_w + 4 * 2 * len("SCALE")) + 10
    width = bar_x + 12 + 8 * 8
    height = max(top + n_r * cell_h + 4, top + 120)
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    draw_text(img, label_w + 2, 3, "SCALE")
    draw_text(img, 2, 16, "LAYER")
    draw_text(img, bar_x, 3, "MARGIN")
    for c, scale in enumerate(result.scales):
        draw_text(img, label_w + c * cell_w + 2, 16, f"{scale:g}"[:5])
    for r in range(n_r):
        y0 = top + r * cell_h
        label = str(result.layers[r]) if r < len(result.layers) else f"#{r - len(result.layers) + 1}"
        draw_text(img, 2, y0 + (cell_h - 10) // 2, label[:5])
        if not result.row_has_vector(r):
            yy, xx = np.mgrid[0:cell_h - 1, 0:n_c * cell_w - 1]
            band = np.empty((cell_h - 1, n_c * cell_w - 1, 3), dtype=np.uint8)
            band[:] = NO_VECTOR_BG
            band[(xx - yy) % 4 == 0] = NO_VECTOR_HATCH
            img[y0:y0 + cell_h - 1, label_w:label_w + n_c * cell_w - 1] = band
            scale = 2 if n_c * cell_w - 1 >= 4 * 2 * len(NO_VECTOR_LABEL) + 4 else 1
            text_w = 4 * scale * len(NO_VECTOR_LABEL)
            tx = label_w + max(0, (n_c * cell_w - text_w) // 2)
            ty = y0 + max(0, (cell_h - 1 - 5 * scale) // 2)
            img[ty - 1:ty + 5 * scale + 1, tx - 2:tx + text_w + 1] = NO_VECTOR_BG  # a clear box for the words
            draw_text(img, tx, ty, NO_VECTOR_LABEL, scale)
            continue
        for c in range(n_c):
            m, _ = result.cell(r, c)
            x0 = label_w + c * cell_w
            color = np.array(diverging_rgb(m / limit) if m is not None else (128, 128, 128), dtype=np.float64)
            block = np.empty((cell_h - 1, cell_w - 1, 3))
            block[:] = color
            if not result.within_budget(r, c):
                block = 0.45 * block + 0.55 * 200  # dimmed ...
                yy, xx = np.mgrid[0:cell_h - 1, 0:cell_w - 1]
                block[(xx + yy) % 6 == 0] = 120  # ... and hatched
            img[y0:y0 + cell_h - 1, x0:x0 + cell_w - 1] = block.astype(np.uint8)
    if result.best is not None:
        r, c = result.best["row"], result.best["col"]
        x0, y0 = label_w + c * cell_w, top + r * cell_h
        for t in range(2):
            img[y0 + t, x0:x0 + cell_w - 1] = 0
            img[y0 + cell_h - 2 - t, x0:x0 + cell_w - 1] = 0
            img[y0:y0 + cell_h - 1, x0 + t] = 0
            img[y0:y0 + cell_h - 1, x0 + cell_w - 2 - t] = 0
    bar_h = 100
    for i in range(bar_h):
        img[top + i, bar_x:bar_x + 10] = diverging_rgb(1 - 2 * i / (bar_h - 1))
    draw_text(img, bar_x + 13, top, f"{limit:.2g}"[:6])
    draw_text(img, bar_x + 13, top + bar_h // 2 - 5, "0")
    draw_text(img, bar_x + 13, top + bar_h - 10, f"-{limit:.2g}"[:7])
    data = png_bytes(img)
    atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


__all__ = ["CELL_H", "CELL_W", "LABEL_W", "NO_VECTOR_BG", "NO_VECTOR_HATCH", "NO_VECTOR_LABEL", "TOP",
           "diverging_rgb", "draw_text", "heatmap_png", "png_bytes"]
