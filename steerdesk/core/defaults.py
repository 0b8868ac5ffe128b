"""Default settings shared by the core, the CLI and the window (no torch import: the window reads
them at start-up, before any model is loaded)."""

from __future__ import annotations

FLUENCY_BUDGET = 0.5
"""Largest fluency loss (nats/token, as a positive number) a sweep's best cell or a search's best
trial may have."""
SEARCH_TRIALS = 25
"""Evaluated trials a search study holds by default (one sixth of the 30 layers x 5 scales grid)."""
SEARCH_BATCH = 5
"""Trials a search proposes (Optuna ask) and scores together by default."""
