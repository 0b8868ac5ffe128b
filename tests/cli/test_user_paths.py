"""Bad paths and forgotten options found by a new user's pass: refused before any work, one line,
exit code 2, nothing lost (export over its own input, a format its name does not say, an output
folder that does not exist, steering options without a vector, devices the machine lacks)."""

from __future__ import annotations

import json

import pytest
import torch

from steerdesk import cli

PROMPT = "Write one sentence about the sea."


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one error line; no traceback, and no model was loaded before the refusal."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("steerdesk: error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def vec(tmp_path_factory, smol):
    from steerdesk.core.datasets import load_bundled
    from steerdesk.core.extract import compute_vectors
    from steerdesk.core.vectors import save_vectors

    ds = load_bundled("neutral_rude")
    ds.examples = ds.examples[:2]
    path = tmp_path_factory.mktemp("paths") / "v.safetensors"
    save_vectors(compute_vectors(smol, ds, batch_size=2), path)
    return path


def test_export_never_writes_over_its_input(capsys, vec, tmp_path):
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(vec.read_bytes())
    before = victim.read_bytes()
    for extra in ([], ["--format", "safetensors"]):
        code, _, err = run(capsys, "export", victim, "-o", victim, *extra)
        assert code == 2 and "also an input" in error_line(err)
        assert victim.read_bytes() == before
    (tmp_path / "link.safetensors").symlink_to(victim)  # the same file under another name
    code, _, err = run(capsys, "export", victim, "-o", tmp_path / "link.safetensors")
    assert code == 2 and "also an input" in error_line(err) and victim.read_bytes() == before


def test_export_format_follows_the_file_name(capsys, vec, tmp_path):
    from steerdesk.core.vectors import load_vectors

    code, _, _ = run(capsys, "export", vec, "-o", tmp_path / "copy.safetensors")
    assert code == 0 and (tmp_path / "copy.safetensors").read_bytes()[8:9] == b"{"  # safetensors header
    assert torch.equal(load_vectors(tmp_path / "copy.safetensors").directions, load_vectors(vec).directions)
    code, _, _ = run(capsys, "export", vec, "-o", tmp_path / "cv.GGUF")
    assert code == 0 and (tmp_path / "cv.GGUF").read_bytes()[:4] == b"GGUF"
    code, _, err = run(capsys, "export", vec, "--format", "safetensors", "-o", tmp_path / "x.gguf")
    assert code == 2 and "--format safetensors" in error_line(err) and not (tmp_path / "x.gguf").exists()
    code, _, err = run(capsys, "export", vec, "-o", tmp_path / "x.txt")
    assert code == 2 and "must end in .gguf or .safetensors" in error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.safetensors", "cv.GGUF"]


@pytest.mark.parametrize("argv, fragment", [
    (["compute", "--dataset", "neutral_rude", "-o", "{tmp}/missing/v.safetensors"], "does not exist"),
    (["compute", "--dataset", "neutral_rude", "-o", "{tmp}/v.txt"], "must end in .safetensors or .gguf"),
    (["compute", "--dataset", "neutral_rude", "-o", "{tmp}"], "is a folder"),
    (["sweep", "--vector", "{vec}", "--dataset", "neutral_rude", "--layers", "3", "--scales", "1",
      "-o", "{tmp}/s.json", "--png", "{tmp}/missing/h.png"], "does not exist"),
    (["sweep", "--vector", "{vec}", "--dataset", "neutral_rude", "--layers", "3", "--scales", "1",
      "-o", "{tmp}/s.json", "--record", "{tmp}/s.json"], "name the same file"),
    (["sweep", "--vector", "{vec}", "--dataset", "neutral_rude", "--layers", "3", "--scales", "1",
      "-o", "{vec}"], "must end in .json"),
    (["search", "--vector", "{vec}", "--dataset", "neutral_rude", "--study", "{tmp}/s.db",
      "--csv", "{tmp}/p.json"], "must end in .csv"),
    (["generate", "--prompt", PROMPT, "--record", "{tmp}/missing/r.json"], "does not exist"),
    (["generate", "--prompt", PROMPT, "--layers", "3"], "--layers set the steering: add --vector"),
    (["generate", "--prompt", PROMPT, "--scale", "2", "--mode", "clamp"], "--scale, --mode set the steering"),
    (["generate", "--prompt", "  "], "The prompt is empty"),
    (["info", "--device", "cuda:7"], "is not available"),
    (["compute", "--dataset", "no_such_set", "-o", "{tmp}/v.safetensors"], "bundled: assistant_golden_retriever, "),
    (["info", "--device", "banana"], "Unknown device 'banana'"),
    (["generate", "--scale", "abc", "--prompt", PROMPT], "steerdesk: error: generate: argument --scale"),
])
def test_refused_before_the_model_loads(capsys, vec, tmp_path, argv, fragment):
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run(capsys, *[a.format(tmp=tmp_path, vec=vec) for a in argv])
    line = error_line(err)  # one line: nothing was loaded first ("Loading ..." would be a second line)
    assert code == 2 and fragment in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_damaged_gguf_model_is_one_line_naming_the_file(capsys, tmp_path, vec):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00truncated")
    code, _, err = run(capsys, "info", "--model", bad)
    lines = [line for line in err.splitlines() if line.startswith("steerdesk: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert f"Cannot read {bad}" in lines[0] and "as a GGUF model" in lines[0]
    cv = tmp_path / "rude.gguf"  # a control vector given as the model
    assert run(capsys, "export", vec, "-o", cv)[0] == 0
    code, _, err = run(capsys, "info", "--model", cv)
    assert code == 2 and str(cv) in err.splitlines()[-1] and "Traceback" not in err


def test_a_generate_recipe_writes_no_file(capsys, fast_model, tmp_path):
    recipe = tmp_path / "g.json"
    code, _, _ = run(capsys, "generate", "--prompt", PROMPT, "--max-new-tokens", "2", "--record", recipe)
    assert code == 0 and json.loads(recipe.read_text())["kind"] == "generate"
    code, _, err = run(capsys, "run", recipe, "-o", tmp_path / "out.json")
    assert code == 2 and "writes no file" in error_line(err) and not (tmp_path / "out.json").exists()
    code, _, err = run(capsys, "run", recipe, "-o", recipe)  # nor over the recipe itself
    assert code == 2 and json.loads(recipe.read_text())["kind"] == "generate"


def test_vectors_of_another_model_name_are_used_with_a_note(capsys, fast_model, vec, tmp_path):
    from steerdesk.core.vectors import load_vectors, save_vectors

    vs = load_vectors(vec)
    vs.metadata["model"] = "SmolLM2-135M-fine-tune"
    other = tmp_path / "other.safetensors"
    save_vectors(vs, other)
    code, out, err = run(capsys, "generate", "--prompt", PROMPT, "--max-new-tokens", "2", "--vector", other,
                         "--layers", "3", "--compare", "--no-stream")
    assert code == 0 and "computed on SmolLM2-135M-fine-tune" in err and fast_model.info.name in err
    assert out.startswith("--- steered ---") and "--- unsteered ---" in out
    code, out, err = run(capsys, "generate", "--prompt", PROMPT, "--max-new-tokens", "2", "--vector", vec,
                         "--layers", "3")
    assert code == 0 and "note" not in err


def test_in_sample_scores_are_named(capsys, fast_model, vec, tmp_path):
    """The vectors' own pairs scored again: a note says the margins are in-sample (the pairs, or a
    file whose training split they are); the held-out part gets no note."""
    from steerdesk.core.datasets import load_bundled, save_dataset
    from steerdesk.core.vectors import VectorSet

    full = load_bundled("neutral_rude")
    full.examples = full.examples[:8]
    train, held = full.split(0.25)
    vs = VectorSet(torch.ones(2, 4), torch.ones(2), {"dataset_sha256": train.sha256(),
                                                     "num_examples": str(len(train))})
    assert "computed from 6 of these 8 pairs" in vs.in_sample_note(full)
    assert "in-sample" in vs.in_sample_note(train)
    assert vs.in_sample_note(held) is None
    vs.metadata["dataset_sha256"] = "0" * 64
    assert vs.in_sample_note(full) is None
    two = load_bundled("neutral_rude")
    two.examples = two.examples[:2]  # the pairs the 'vec' fixture was computed from
    save_dataset(two, tmp_path / "two.jsonl")
    code, _, err = run(capsys, "sweep", "--vector", vec, "--dataset", tmp_path / "two.jsonl", "--layers", "3",
                       "--scales", "1", "-o", tmp_path / "s.json")
    assert code == 0 and "note: the vectors were computed from 2 of these 2 pairs" in err


def test_sampling_options_under_greedy_decoding_are_named(capsys, fast_model):
    code, _, err = run(capsys, "generate", "--prompt", PROMPT, "--max-new-tokens", "1", "--seed", "5", "--top-p", "0.9")
    assert code == 0 and "note: --seed and --top-p apply to sampling" in err
    code, _, err = run(capsys, "generate", "--prompt", PROMPT, "--max-new-tokens", "1", "--seed", "5",
                       "--temperature", "0.7")
    assert code == 0 and "note" not in err


def test_outputs_found_by_review_are_refused_before_work(capsys, fast_model, vec, tmp_path):
    """search --export-baked into an existing folder (was: refused only after the whole search);
    a sweep re-run's -o over the recipe's own dataset file; bake --force over an earlier bake
    that holds the vector file the bake reads."""
    from steerdesk.core.datasets import load_bundled, save_dataset

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "search", "--vector", vec, "--dataset", "neutral_rude", "--study", tmp_path / "s.db",
                       "--trials", "1", "--export-baked", tmp_path / "taken")
    assert code == 2 and "already exists" in error_line(err) and not (tmp_path / "s.db").exists()

    two = load_bundled("neutral_rude")
    two.examples = two.examples[:2]
    pairs = tmp_path / "pairs.json"
    save_dataset(two, pairs)
    before = pairs.read_bytes()
    code, _, _ = run(capsys, "sweep", "--vector", vec, "--dataset", pairs, "--layers", "3", "--scales", "1",
                     "-o", tmp_path / "s.json", "--record", tmp_path / "rec.json")
    assert code == 0
    code, _, err = run(capsys, "run", tmp_path / "rec.json", "-o", pairs)
    assert code == 2 and "also an input" in error_line(err) and pairs.read_bytes() == before

    old = tmp_path / "old-bake"
    old.mkdir()
    (old / "steerdesk_bake.json").write_text("{}")
    inside = old / "v.safetensors"
    inside.write_bytes(vec.read_bytes())
    code, _, err = run(capsys, "bake", "--vector", inside, "--layers", "3", "-o", old, "--force")
    assert code == 2 and "which this bake reads" in error_line(err) and inside.read_bytes() == vec.read_bytes()
