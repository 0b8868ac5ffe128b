"""Fixtures for the real-X11 tests: an Xvfb server and a tiny model folder.

Everything that runs on X11 runs in a subprocess with ``QT_QPA_PLATFORM=xcb``; this test
process keeps whatever platform the rest of the suite uses (offscreen under ``make test``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from x11_helpers import SCREEN


@pytest.fixture(scope="module")
def xvfb() -> Iterator[str]:
    """A private Xvfb server on a free display number (``-displayfd``); yields ``":N"``."""
    binary = shutil.which("Xvfb")
    if binary is None:
        pytest.skip("Xvfb is not installed (Debian: apt-get install xvfb; .ci/run installs it)")
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [binary, "-displayfd", str(write_fd), "-screen", "0", f"{SCREEN[0]}x{SCREEN[1]}x24",
         "-nolisten", "tcp", "-noreset"],
        pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(write_fd)
    try:
        number = b""
        deadline = time.monotonic() + 20
        while not number.endswith(b"\n") and time.monotonic() < deadline:
            chunk = os.read(read_fd, 16)  # Xvfb writes "N\n" once it accepts connections
            if not chunk:
                break
            number += chunk
        if not number.strip():
            proc.kill()
            raise RuntimeError(f"Xvfb did not start: {proc.communicate(timeout=5)[1].decode()[-500:]}")
        yield f":{int(number)}"
    finally:
        os.close(read_fd)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smol_folder: Path) -> Path:
    """A tiny random Llama (4 layers, hidden 64) with the SmolLM2 tokenizer, saved as an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(str(smol_folder))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-x11")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
