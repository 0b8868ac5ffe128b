"""Fixtures shared by the CLI tests."""

from __future__ import annotations

import pytest

from steerdesk.core import models


@pytest.fixture
def fast_model(monkeypatch, smol):
    """Reuse the session's loaded SmolLM2 instead of loading it again for every command."""
    real_load = models.load_model

    def fake_load(spec="default", **kwargs):
        if spec not in (None, "", "default"):
            return real_load(spec, **kwargs)
        return smol

    monkeypatch.setattr(models, "load_model", fake_load)
    return smol
