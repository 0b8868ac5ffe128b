"""``--quantize int8``: a lossy CPU decode mode, recorded, re-run exactly, refused where it cannot apply."""

from __future__ import annotations

import json

import pytest

from steerdesk import cli


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_folder):
    return tiny_llama_folder


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_generate_is_recorded_and_reruns_token_for_token(capsys, tiny_llama, tmp_path, monkeypatch, mode):
    args = ["--model", str(tiny_llama), "--device", "cpu", "--dtype", "float32", "--quantize", mode]
    code, out, err = run(capsys, "info", *args, "--json")
    assert code == 0, err
    assert json.loads(out)["quantization"] == mode
    recipe = tmp_path / "gen.json"
    code, out, err = run(capsys, "generate", *args, "--prompt", "Tell me about cats.", "--max-new-tokens", "10",
                         "--json", "--record", str(recipe))
    assert code == 0, err
    first = json.loads(out)
    saved = json.loads(recipe.read_text())
    assert saved["quantization"] == mode
    code, out, err = run(capsys, "generate", "--model", str(tiny_llama), "--device", "cpu", "--dtype", "float32",
                         "--prompt", "Tell me about cats.", "--max-new-tokens", "10", "--json")
    assert code == 0, err
    plain = json.loads(out)
    assert "quantization" not in json.dumps(plain)  # unquantised output reads as before
    from steerdesk.core import models

    asked = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: asked.append(k.get("quantize")) or real(*a, **k))
    code, out, err = run(capsys, "run", str(recipe), "--json")
    assert code == 0, err
    assert asked == [mode]  # the re-run loads the model as recorded, quantised
    rerun = json.loads(out)
    assert rerun["reproduced"] is True and rerun["differences"] == []
    assert rerun["record"]["outputs"]["rows"][0]["token_ids"] == saved["outputs"]["rows"][0]["token_ids"]
    assert first  # the generate output itself was JSON


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_refused_in_one_line_where_it_cannot_apply(capsys, tiny_llama, tmp_path, mode):
    code, _, err = run(capsys, "info", "--model", str(tiny_llama), "--device", "cpu", "--dtype", "bfloat16",
                       "--quantize", mode)
    assert code == 2 and err.count("error") == 1 and "float32" in err and mode in err and "Loading" not in err, err
    code, _, err = run(capsys, "info", "--model", str(tiny_llama), "--quantize", "int2")
    assert code == 2 and "int2" in err
