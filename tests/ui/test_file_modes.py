"""Files the window writes respect the umask, like other desktop apps' files (issue 13): dataset
saves and exports, vector files (safetensors, GGUF), recipes, grid exports, heatmap PNGs, the
recovery copy and the settings file."""

from __future__ import annotations

import os
import stat

import pytest
import torch


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    try:
        yield 0o664
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_writer_of_the_window_respects_the_umask(qtbot, window, tmp_path, umask_002):
    from steerdesk.core.records import RunRecord
    from steerdesk.core.vectors import VectorSet

    want = umask_002
    written = {}
    dp = window.dataset_panel
    dp.load_bundled("neutral_rude")
    assert dp.save(tmp_path / "data.jsonl")
    written["dataset"] = tmp_path / "data.jsonl"
    assert dp.export_to(tmp_path / "data.csv")
    written["dataset export"] = tmp_path / "data.csv"
    window.dataset_panel._recovery.save(dp.dataset(), None)
    written["recovery copy"] = next(p for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert window.generation_panel.heatmap.export_png(str(tmp_path / "heat.png"))
    written["heatmap PNG"] = tmp_path / "heat.png"

    n, h = 4, 64
    vs = VectorSet(torch.randn(n, h), torch.ones(n), {"model": "m", "architecture": "LlamaForCausalLM"})
    from steerdesk.core.vectors import export_gguf, save_vectors

    for name, suffix, fn in (("vector file", ".safetensors", save_vectors), ("GGUF export", ".gguf", export_gguf)):
        path = tmp_path / f"v{suffix}"
        fn(vs, path)  # what the panel's Save/Export buttons call with the dialog's path
        written[name] = path

    rec = RunRecord(kind="generate", model="default", seconds=1.0)
    window.analysis_panel.history.records.append(rec)
    window.analysis_panel.history.export_to(str(tmp_path / "recipe.json"), row=len(
        window.analysis_panel.history.records) - 1)
    written["recipe"] = tmp_path / "recipe.json"
    window.save_settings()
    written["settings"] = os.environ["STEERDESK_SETTINGS"]

    wrong = {k: oct(mode(p)) for k, p in written.items() if mode(p) != want}
    assert wrong == {}, f"want {oct(want)}"
    assert len(written) >= 8
