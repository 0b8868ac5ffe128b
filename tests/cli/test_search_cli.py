"""``steerdesk search`` on a tiny model folder: outputs, resume, exports; bad input: one line, exit 2."""

from __future__ import annotations

import csv
import io
import json
import sqlite3

import pytest
import torch

from steerdesk import cli


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smol_folder):
    """A tiny Llama saved to a folder (loaded by path: float32, CPU)."""
    import transformers as T
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_folder))
    folder = tmp_path_factory.mktemp("tiny-search") / "llama"
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _vector_file(path, folder, seed=1):
    from steerdesk.core.vectors import VectorSet, save_vectors

    g = torch.Generator().manual_seed(seed)
    meta = {"model": str(folder), "architecture": "LlamaForCausalLM", "method": "mean-diff",
            "read_position": "last", "layer_convention": "block_output"}
    save_vectors(VectorSet(torch.randn(4, 64, generator=g) * 2, torch.ones(4), meta), path)
    return path


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _base(folder, vec, study):
    return ["search", "--model", folder, "--device", "cpu", "--dtype", "float32", "--vector", vec,
            "--dataset", "neutral_rude", "--max-pairs", 3, "--study", study]


def _one_error_line(code, err):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("steerdesk:")]  # not the loader's progress lines
    assert len(lines) == 1 and lines[0].startswith("steerdesk: error:") and "Traceback" not in err, err
    return lines[0]


def test_search_writes_pareto_json_csv_records_exports_and_resumes(capsys, tiny_folder, tmp_path):
    vec = _vector_file(tmp_path / "v.safetensors", tiny_folder)
    study, out, table = tmp_path / "s.db", tmp_path / "pareto.json", tmp_path / "pareto.csv"
    code, stdout, err = run(capsys, *_base(tiny_folder, vec, study), "--trials", 4, "--batch", 2, "--seed", 3,
                            "-o", out, "--csv", table, "--pick", 0, "--export-vector", tmp_path / "chosen.safetensors",
                            "--export-recipe", tmp_path / "recipe.json", "--max-new-tokens", 3)
    assert code == 0, err
    assert "4 trials evaluated" in stdout and "pareto front" in stdout
    obj = json.loads(out.read_text())
    assert obj["evaluated"] == 4 and obj["seed"] == 3 and obj["pareto"]
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    assert [int(r["trial"]) for r in rows] == [p["number"] for p in obj["pareto"]]
    records = sorted((tmp_path / "s-records").glob("trial-*.json"))
    assert [r.name for r in records] == [f"trial-000{i}.json" for i in range(4)]
    assert json.loads(records[0].read_text())["kind"] == "sweep"
    from steerdesk.core.vectors import load_vectors

    chosen = json.loads(load_vectors(tmp_path / "chosen.safetensors").metadata["steering_settings"])
    assert chosen["trial"] == 0 and chosen["layers"] == obj["trials"][0]["settings"]["layers"]
    recipe = json.loads((tmp_path / "recipe.json").read_text())
    assert recipe["kind"] == "generate" and recipe["layers"] == chosen["layers"]
    # The recipe re-runs token for token.
    code, stdout, err = run(capsys, "run", tmp_path / "recipe.json", "--device", "cpu")
    assert code == 0, err
    # Resume to 6 trials: the first 4 are kept as they were.
    code, stdout, err = run(capsys, *_base(tiny_folder, vec, study), "--trials", 6, "--batch", 2, "--json",
                            "--no-records")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["evaluated"] == 6 and summary["evaluated_now"] == 2


def test_bad_input_is_one_line_exit_2_and_the_study_is_untouched(capsys, tiny_folder, tmp_path):
    vec = _vector_file(tmp_path / "v.safetensors", tiny_folder)
    other_vec = _vector_file(tmp_path / "w.safetensors", tiny_folder, seed=9)
    study = tmp_path / "s.db"
    code, _, err = run(capsys, *_base(tiny_folder, vec, study), "--trials", 2, "--batch", 2, "--no-records")
    assert code == 0, err
    state = (study.read_bytes(), study.stat().st_mtime_ns)
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    text = tmp_path / "notes.db"
    text.write_text("hello\n")
    cases = [
        (["--trials", 0], study, "--trials must be at least 1"),
        (["--space", "layers=3-1"], study, "empty"),
        (["--space", "modes=warp"], study, "Unknown steering mode"),
        (["--seed", 9], study, "seed"),
        (["--vector", other_vec], study, "another vector set"),
        ([], foreign, "not an Optuna study"),
        ([], text, "not an SQLite"),
    ]
    for extra, path, words in cases:
        before = (path.read_bytes(), path.stat().st_mtime_ns)
        argv = _base(tiny_folder, vec, path) + ["--no-records"] + [str(a) for a in extra]
        code, _, err = run(capsys, *argv)
        line = _one_error_line(code, err)
        assert words in line, (extra, line)
        assert (path.read_bytes(), path.stat().st_mtime_ns) == before, extra
    assert (study.read_bytes(), study.stat().st_mtime_ns) == state
    # A budget of 0 on a new file creates nothing.
    code, _, err = run(capsys, *_base(tiny_folder, vec, tmp_path / "new.db"), "--trials", 0)
    _one_error_line(code, err)
    assert not (tmp_path / "new.db").exists()


def test_picked_trial_bakes_into_a_checkpoint_folder(capsys, tiny_folder, tmp_path):
    vec = _vector_file(tmp_path / "v.safetensors", tiny_folder)
    out = tmp_path / "baked"
    code, _, err = run(capsys, *_base(tiny_folder, vec, tmp_path / "b.db"), "--trials", 2, "--batch", 2,
                       "--space", "modes=add;normalize=no", "--pick", 1, "--export-baked", out, "--no-records")
    assert code == 0, err
    assert (out / "config.json").is_file()
    from steerdesk.core.search import load_result

    trial = load_result(tmp_path / "b.db").trial(1)
    code, stdout, err = run(capsys, "generate", "--model", out, "--device", "cpu", "--dtype", "float32",
                            "--prompt", "Hi", "--max-new-tokens", 4, "--json")
    assert code == 0, err
    baked = json.loads(stdout)["token_ids"]
    code, stdout, err = run(capsys, "generate", "--model", tiny_folder, "--device", "cpu", "--dtype", "float32",
                            "--prompt", "Hi", "--max-new-tokens", 4, "--json", "--vector", vec, "--layers",
                            f"{trial.settings.layers[0]}-{trial.settings.layers[-1]}", "--scale",
                            repr(trial.settings.scale))
    assert code == 0, err
    assert json.loads(stdout)["token_ids"] == baked  # the checkpoint generates what the steering does
