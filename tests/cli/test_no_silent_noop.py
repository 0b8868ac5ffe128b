"""Issue 10, kinds 1 and 4: steering that would do nothing is refused or marked, never silent;
negative numbers on the command line are read whichever way they are written.

Each case is an input a user can make (a GGUF control vector has no slot for block 0; other
tools' files skip layers) with the right value stated independently of steerdesk's code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from steerdesk import cli
from steerdesk.core.errors import SteerdeskError

pytestmark = pytest.mark.slow

PROMPT = "Write one sentence about the sea."


@pytest.fixture(scope="module")
def files(tmp_path_factory, smol):
    """The issue's commands: compute -> safetensors, export -> GGUF (no block 0)."""
    from steerdesk.core.datasets import load_bundled, save_dataset
    from steerdesk.core.extract import compute_vectors
    from steerdesk.core.vectors import export_gguf, save_vectors

    train, held = load_bundled("neutral_rude").split(0.25)
    train.examples, held.examples = train.examples[:8], held.examples[:4]
    folder = tmp_path_factory.mktemp("noop")
    save_dataset(held, folder / "held4.jsonl")
    st = folder / "v.safetensors"
    vs = compute_vectors(smol, train, batch_size=8)
    save_vectors(vs, st)
    gg = folder / "v.gguf"
    export_gguf(vs, gg)
    return {"st": st, "gguf": gg, "vs": vs, "held": folder / "held4.jsonl"}


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------ kind 1: no silent no-op

def test_gguf_knows_it_has_no_block_0(files):
    from steerdesk.core.vectors import load_vectors

    vs = load_vectors(files["gguf"], model_layers=30)
    assert vs.present.tolist() == [False] + [True] * 29
    assert not vs.has_direction(0) and vs.has_direction(1) and vs.layers_with_direction == list(range(1, 30))
    st = load_vectors(files["st"])
    assert st.present.tolist() == [True] * 30


def test_issue_command_steering_layer_0_of_a_gguf_is_exit_2(capsys, fast_model, files):
    """The issue's exact command used to print two identical texts and exit 0."""
    code, out, err = run(capsys, "generate", "--prompt", PROMPT, "--vector", files["gguf"], "--layers", "0",
                         "--scale", "8", "--max-new-tokens", "10", "--compare", "--json")
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert "no direction for layer 0" in line and "no slot for block 0" in line and "layers 1-29" in line


def test_the_same_request_at_a_layer_the_gguf_has_runs_and_steers(capsys, fast_model, files):
    code, out, err = run(capsys, "generate", "--prompt", PROMPT, "--vector", files["gguf"], "--layers", "1",
                         "--scale", "8", "--max-new-tokens", "10", "--compare", "--json")
    assert code == 0, err
    obj = json.loads(out)
    assert obj["token_ids"] != obj["unsteered"]["token_ids"]


def test_present_survives_safetensors_round_trip_and_foreign_gguf_with_gaps(tmp_path, smol):
    """A file that skips layers (as other tools write) loads with those layers absent, not zero."""
    import gguf

    from steerdesk.core.vectors import export_gguf, load_vectors, save_vectors

    hidden = smol.info.hidden_size
    path = tmp_path / "foreign.gguf"
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_int32("controlvector.layer_count", 29)
    rng = np.random.default_rng(0)
    for layer in (3, 5, 9):
        w.add_tensor(f"direction.{layer}", rng.standard_normal(hidden).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    vs = load_vectors(path, model_layers=30)
    assert vs.layers_with_direction == [3, 5, 9]
    with pytest.raises(SteerdeskError, match=r"no direction for layers 4, 6-8: .* It has layers 3, 5, 9"):
        vs.require_layers([3, 4, 6, 7, 8])
    save_vectors(vs, tmp_path / "kept.safetensors")
    back = load_vectors(tmp_path / "kept.safetensors")
    assert back.layers_with_direction == [3, 5, 9]
    assert export_gguf(back, tmp_path / "again.gguf") == [3, 5, 9]  # absent layers are not written as zeros


def test_an_all_zero_direction_is_no_direction(capsys, fast_model, files, tmp_path):
    from steerdesk.core.vectors import load_vectors, save_vectors

    vs = load_vectors(files["st"])
    vs.directions[14] = 0
    vs.present = None
    vs.__post_init__()
    path = tmp_path / "zero14.safetensors"
    save_vectors(vs, path)
    code, _, err = run(capsys, "generate", "--prompt", PROMPT, "--vector", path, "--layers", "13-15",
                       "--max-new-tokens", "4")
    assert code == 2 and "no direction for layer 14" in one_error_line(err)
    # scale 0 stays allowed at a layer that has a direction: it is the identity
    code, out, err = run(capsys, "generate", "--prompt", PROMPT, "--vector", path, "--layers", "13", "--scale", "0",
                         "--compare", "--max-new-tokens", "6", "--json")
    assert code == 0, err
    obj = json.loads(out)
    assert obj["token_ids"] == obj["unsteered"]["token_ids"]


def test_inspect_marks_layers_without_a_vector_null_never_zero(capsys, fast_model, files):
    code, out, err = run(capsys, "inspect", files["gguf"], "--dataset", files["held"], "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["no_vector"] == [0]
    assert d["auc"][0] is None and d["vector_norm"][0] is None and d["relative_norm"][0] is None
    assert all(c is None for c in d["cosine"][0]) and d["cosine"][1][1] == pytest.approx(1.0)
    assert d["auc"][14] is not None
    code, out, _ = run(capsys, "inspect", files["gguf"], "--dataset", files["held"])
    assert out.splitlines()[1].split() == ["0", "no", "vector"]


def test_grid_rows_without_a_vector_are_null_and_other_cells_do_not_change(files, smol):
    from steerdesk.core.generate import SamplingSettings, generate
    from steerdesk.core.steering import Steer
    from steerdesk.core.textgrid import generation_grid, grid_to_csv
    from steerdesk.core.vectors import load_vectors

    vs = load_vectors(files["gguf"], model_layers=30)
    sampling = SamplingSettings(max_new_tokens=6)
    seen = []
    rows = generation_grid(smol, vs, [0, 14], [4.0], [PROMPT], sampling=sampling, on_row=seen.append)
    assert [(r.layer, r.no_vector) for r in rows] == [(None, False), (0, True), (14, False)]
    assert seen == rows  # streamed in grid order
    assert rows[1].text is None and rows[1].matches is None
    alone = generate(smol, [PROMPT], [Steer(14, vs.directions[14], 4.0)], sampling=sampling)[0]
    assert rows[2].text == alone.text
    assert json.loads(json.dumps([r.__dict__ for r in rows]))[1]["text"] is None
    assert grid_to_csv(rows).splitlines()[2].endswith(",no vector")


def test_recipe_steering_a_layer_without_a_vector_is_refused_on_rerun(capsys, fast_model, files, tmp_path):
    recipe = tmp_path / "r.json"
    code, _, err = run(capsys, "generate", "--prompt", PROMPT, "--vector", files["gguf"], "--layers", "1",
                       "--max-new-tokens", "4", "--record", recipe)
    assert code == 0, err
    obj = json.loads(recipe.read_text())
    for s in obj["settings"]["steers"]:
        s["layer"] = 0  # as a recipe written before this check could hold
    obj["layers"] = [0]
    recipe.write_text(json.dumps(obj))
    code, _, err = run(capsys, "run", recipe)
    assert code == 2 and "no direction for layer 0" in one_error_line(err)


def test_window_request_for_a_layer_without_direction_is_refused():
    """The generation pane's request goes through VectorSet.steers: the same one-line refusal."""
    from steerdesk.core.vectors import VectorSet

    vs = VectorSet(torch.ones(4, 8), torch.ones(4), present=torch.tensor([False, True, True, True]))
    with pytest.raises(SteerdeskError, match="no direction for layer 0"):
        vs.steers([0, 2], scale=3.0)
    assert [s.layer for s in vs.steers([1, 2], scale=3.0)] == [1, 2]


# -------------------------------------------------------------- kind 4: negative numbers

def test_negative_scale_lists_either_way(capsys, fast_model, files, tmp_path):
    results = []
    for argv in (["--scales", "-2,0,2"], ["--scales=-2,0,2"]):
        out_file = tmp_path / f"s{len(results)}.json"
        code, _, err = run(capsys, "sweep", "--vector", files["st"], "--dataset", files["held"], "--layers", "14",
                           *argv, "--max-pairs", "1", "-o", out_file, "--json")
        assert code == 0, err
        results.append(json.loads(out_file.read_text()))
    assert results[0]["scales"] == [-2.0, 0.0, 2.0]
    assert results[0]["margin_delta"] == results[1]["margin_delta"]


@pytest.mark.parametrize("value", ["-2", "-.5e1"])
def test_negative_scale_either_way_gives_the_same_tokens(capsys, fast_model, files, value):
    outs = []
    for argv in (["--scale", value], [f"--scale={value}"]):
        code, out, err = run(capsys, "generate", "--prompt", PROMPT, "--vector", files["st"], "--layers", "14",
                             *argv, "--max-new-tokens", "5", "--json")
        assert code == 0, err
        outs.append(json.loads(out)["token_ids"])
    assert outs[0] == outs[1]


def test_a_negative_value_reaches_its_own_check(capsys, fast_model):
    """Not 'expected one argument': the value is read, then refused for what it is."""
    code, _, err = run(capsys, "generate", "--prompt", PROMPT, "--temperature", "-1", "--max-new-tokens", "2")
    assert code == 2 and "temperature must be a number >= 0" in one_error_line(err)
    code, _, err = run(capsys, "sweep", "--vector", "x", "--dataset", "neutral_rude", "--heldout", "-0.5",
                       "-o", "o.json")
    assert code == 2 and "--heldout must be in [0, 1)" in one_error_line(err)


def test_help_shows_a_negative_example(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--help"])
    assert "-2,0,2" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    assert "-2" in capsys.readouterr().out


def test_join_negative_values_never_touches_flags_or_words():
    from steerdesk.cli import _FLAG_OPTIONS, _flag_options, build_parser, join_negative_values

    _FLAG_OPTIONS.update(_flag_options(build_parser()))
    assert join_negative_values(["sweep", "--scales", "-2,0,2", "--normalize", "--max-pairs", "3"]) == \
        ["sweep", "--scales=-2,0,2", "--normalize", "--max-pairs", "3"]
    assert join_negative_values(["generate", "--prompt", "-not a number", "--compare", "-1"]) == \
        ["generate", "--prompt", "-not a number", "--compare", "-1"]


# ----------------------------------------------------- kind 2: one random stream per row

def test_issue_command_identity_compare_under_sampling_is_token_identical(capsys, fast_model, files):
    """`--scale 0 --temperature 1.0 --seed 7 --compare`: both rows draw the same stream."""
    code, out, err = run(capsys, "generate", "--prompt", PROMPT, "--vector", files["st"], "--layers", "14",
                         "--scale", "0", "--temperature", "1.0", "--seed", "7", "--max-new-tokens", "12",
                         "--compare", "--json")
    assert code == 0, err
    obj = json.loads(out)
    assert obj["token_ids"] == obj["unsteered"]["token_ids"] and obj["text"] == obj["unsteered"]["text"]


def test_steered_row_is_the_same_with_and_without_compare_under_sampling(capsys, fast_model, files):
    argv = ["generate", "--prompt", PROMPT, "--vector", files["st"], "--layers", "14", "--scale", "4",
            "--temperature", "1.0", "--seed", "7", "--max-new-tokens", "12", "--json"]
    outs = []
    for extra in ([], ["--compare"]):
        code, out, err = run(capsys, *argv, *extra)
        assert code == 0, err
        outs.append(json.loads(out)["token_ids"])
    assert outs[0] == outs[1]
