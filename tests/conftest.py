"""Shared fixtures for every test folder: offline hub, the converted embedded model, SmolLM2."""

from __future__ import annotations

import os

# No test may reach the network: every model is built from a config or is the embedded GGUF.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The CPU kernel decision goes to a file of this test session, never the user's cache folder.
import tempfile

os.environ.setdefault("STEERDESK_CPU_LINEAR_CACHE",
                      os.path.join(tempfile.mkdtemp(prefix="steerdesk-kernel-"), "cpu-linear.json"))

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smol_folder() -> Path:
    """Folder of the embedded SmolLM2 converted to safetensors (converted once if missing).

    Loading a tokenizer from here costs well under a second; loading the model costs ~3 s.
    """
    from steerdesk.core import models

    folder, gguf_file = models.resolve_source(models.DEFAULT_MODEL)
    cached = models._gguf_cache_folder(folder, gguf_file)
    if not (cached / "config.json").is_file():
        models._convert_gguf(folder, gguf_file, cached, None)
    return cached


@pytest.fixture(scope="session")
def smol(smol_folder: Path):
    """The real embedded SmolLM2-135M-Instruct as a ``LoadedModel`` (CPU, float32), loaded once."""
    from steerdesk.core.models import load_model

    return load_model(device="cpu", dtype="float32")
