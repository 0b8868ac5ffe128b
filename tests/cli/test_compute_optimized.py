"""``steerdesk compute --method optimized`` (issue 17): refusals before the model loads, one real run."""

from __future__ import annotations

import json

import pytest

from steerdesk import cli
from steerdesk.core import models

pytestmark = pytest.mark.slow


def _small(tmp_path, n):
    from steerdesk.core.datasets import load_bundled, save_dataset

    ds = load_bundled("neutral_rude")
    ds.examples = ds.examples[:n]
    path = tmp_path / f"small{n}.jsonl"
    save_dataset(ds, path)
    return str(path)


@pytest.mark.parametrize("extra, fragment", [
    (["--method", "optimized", "--layers", "3"], "at least 3 pairs"),
    (["--method", "optimized"], "--layers"),
    (["--layers", "3"], "--method optimized"),
    (["--method", "optimized", "--layers", "3", "--lr", "0"], "positive"),
])
def test_refused_before_the_model_loads(capsys, monkeypatch, tmp_path, extra, fragment):
    def no_load(*args, **kwargs):
        raise AssertionError("the model should not load")

    monkeypatch.setattr(models, "load_model", no_load)
    out_file = tmp_path / "v.safetensors"
    code = cli.main(["compute", "--dataset", _small(tmp_path, 2), "-o", str(out_file), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert fragment in err and "Traceback" not in err
    assert not out_file.exists()


def test_optimized_writes_an_ordinary_vector_file(capsys, fast_model, tmp_path):
    from steerdesk.core.vectors import load_vectors

    out_file = tmp_path / "opt.safetensors"
    code = cli.main(["compute", "--dataset", _small(tmp_path, 4), "--method", "optimized", "--layers", "28",
                     "--kl-weight", "0", "--epochs", "1", "--batch-size", "3", "-o", str(out_file), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert summary["optimize"]["layers"] == [28] and summary["optimize"]["validation_pairs"] == 1
    assert len(summary["optimize"]["curves"]["28"]["val"]) == 2  # the start and one epoch
    vs = load_vectors(out_file)
    assert vs.metadata["method"] == "optimized" and vs.layers_with_direction == [28]


def test_optimized_compute_recipe_reruns_to_the_same_vector(capsys, tiny_llama_folder, tmp_path):
    """The recipe of an optimized computation carries its layers and settings, so `run` re-trains the
    same vector (same seed) instead of stopping for want of --layers."""
    recipe = tmp_path / "opt.json"
    model = ["--model", str(tiny_llama_folder), "--device", "cpu", "--dtype", "float32"]
    code = cli.main(["compute", *model, "--dataset", _small(tmp_path, 6), "--method", "optimized", "--layers", "2",
                     "--epochs", "2", "--batch-size", "3", "--lr", "0.2", "--seed", "3",
                     "-o", str(tmp_path / "o.safetensors"), "--record", str(recipe)])
    _, err = capsys.readouterr()
    assert code == 0, err
    saved = json.loads(recipe.read_text())
    assert saved["layers"] == [2] and saved["settings"]["optimize"]["epochs"] == 2
    assert saved["settings"]["optimize"]["lr"] == 0.2 and saved["settings"]["optimize"]["seed"] == 3
    code = cli.main(["run", str(recipe), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["reproduced"] is True


@pytest.mark.parametrize("extra, fragment", [
    (["--layers", "2"], "--heldout"),
    (["--heldout", "0.25"], "--layers"),
    (["--heldout", "0.25", "--layers", "2", "--methods", "mean-diff,lora"], "Unknown method 'lora'"),
    (["--heldout", "0.25", "--layers", "2", "--scales", "1,x"], "Cannot read scales"),
    (["--heldout", "0.25", "--layers", "2", "--kl-weight", "-1"], "kl_weight"),
])
def test_inspect_compare_refused_before_the_model_loads(capsys, monkeypatch, tmp_path, extra, fragment):
    def no_load(*args, **kwargs):
        raise AssertionError("the model should not load")

    vec = tmp_path / "v.safetensors"
    vec.write_bytes(b"x")
    monkeypatch.setattr(models, "load_model", no_load)
    code = cli.main(["inspect", str(vec), "--dataset", _small(tmp_path, 8), "--compare", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert fragment in err and "Traceback" not in err


def test_inspect_compare_rows(capsys, tiny_llama_folder, tmp_path):
    """`inspect --compare`: one row per method, the file as its own row, the prompt baseline. The file is
    the mean difference of the same training split (written by `compute --heldout`), so its row must
    equal the mean-diff row computed inside the comparison: the same split, layers, scales and budget."""
    model = ["--model", str(tiny_llama_folder), "--device", "cpu", "--dtype", "float32"]
    data = _small(tmp_path, 10)
    vec = tmp_path / "md.safetensors"
    assert cli.main(["compute", *model, "--dataset", data, "--heldout", "0.3", "-o", str(vec)]) == 0
    capsys.readouterr()
    code = cli.main(["inspect", str(vec), *model, "--dataset", data, "--heldout", "0.3", "--compare",
                     "--layers", "1,2", "--scales", "0.5,1,4", "--budget", "100", "--instruction", "Reply rudely.",
                     "--epochs", "1", "--batch-size", "4", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    got = json.loads(out)
    rows = {m["method"]: m for m in got["methods"]}
    assert list(rows) == ["mean-diff", "pca", "optimized", "md.safetensors"]
    assert got["train_pairs"] == 7 and got["heldout_pairs"] == 3 and got["layers"] == [1, 2]
    for a, b in zip(rows["md.safetensors"]["margin_delta"], rows["mean-diff"]["margin_delta"]):
        assert a == pytest.approx(b, abs=1e-5)
    for row in rows.values():  # budget 100: the best is the largest margin of the grid
        assert row["best_margin"] == pytest.approx(max(max(r) for r in row["margin_delta"]))
    assert got["prompt"]["instruction"] == "Reply rudely." and got["winner"] is not None
    code = cli.main(["inspect", str(vec), *model, "--dataset", data, "--heldout", "0.3", "--compare",
                     "--layers", "2", "--methods", "mean-diff"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "mean-diff" in out and "Best within the budget" in out


def test_inspect_compare_record_reruns(capsys, tiny_llama_folder, tmp_path):
    """`inspect --compare --record R` writes a `compare` recipe; `steerdesk run R` re-runs the comparison
    (the inspected file's row from its embedded vectors) and reproduces it."""
    model = ["--model", str(tiny_llama_folder), "--device", "cpu", "--dtype", "float32"]
    data = _small(tmp_path, 10)
    vec = tmp_path / "md.safetensors"
    assert cli.main(["compute", *model, "--dataset", data, "--heldout", "0.3", "-o", str(vec)]) == 0
    recipe = tmp_path / "compare.json"
    code = cli.main(["inspect", str(vec), *model, "--dataset", data, "--heldout", "0.3", "--compare",
                     "--layers", "2", "--scales", "0.5,2", "--methods", "mean-diff", "--record", str(recipe)])
    capsys.readouterr()
    assert code == 0 and json.loads(recipe.read_text())["kind"] == "compare"
    assert cli.main(["run", str(recipe), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "md.safetensors" in out and "compare: reproduced the recorded outputs" in out, out + err
