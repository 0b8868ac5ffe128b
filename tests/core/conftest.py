"""Fixtures for tests/core: the SmolLM2 tokenizer and tiny models of several architectures."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tinylm import ARCHS, build_tiny, steerdesk_hooks


@pytest.fixture(scope="session")
def tokenizer(smol_folder):
    """The embedded SmolLM2 tokenizer (with its chat template), shared by all tiny models."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_folder))
    assert tok.chat_template, "the SmolLM2 tokenizer should carry a chat template"
    return tok


@pytest.fixture(scope="session")
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template (plain-text formatting path)."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Run tests/core on one intra-op thread (restored after each module, so other folders keep theirs).

    The models here are tiny (or 135M parameters): a second OpenMP thread buys nothing, and on
    a 2-core machine with anything else running, the threads' barrier made each 64x64 matmul
    take 8-16 ms instead of 10 us (a 20x slowdown of the whole suite).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_CACHE: dict[str, Any] = {}


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny(arch, tokenizer, plain_tokenizer):
    """A tiny model of ``arch``, built once per session.

    Not for checks through ``output_hidden_states`` under steering: transformers installs its
    capture hooks lazily on the first such call, and capture hooks installed before the steering
    hooks record a block's output *before* steering. Use ``fresh_tiny`` there.
    """
    if arch not in _CACHE:
        _CACHE[arch] = build_tiny(arch, tokenizer, plain_tokenizer)
    lm = _CACHE[arch]
    yield lm
    # A test that leaked a steering hook must not poison the next one.
    leaked = [h for m in [lm.model, *lm.blocks] for h in steerdesk_hooks(m)]
    assert not leaked, f"steerdesk hooks left installed: {leaked}"


@pytest.fixture
def fresh_tiny(tokenizer, plain_tokenizer) -> Callable[..., Any]:
    """Factory ``fresh_tiny(arch, dtype=torch.float32)``: a model no hook has touched yet."""
    return lambda arch, dtype=torch.float32: build_tiny(arch, tokenizer, plain_tokenizer, dtype)
