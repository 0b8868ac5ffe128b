"""Generation sweep grid and prompt-vs-vector comparison."""

from __future__ import annotations

import csv
import io
import json

import pytest
from tinylm import random_vectors

from steerdesk.core.datasets import Dataset, Example
from steerdesk.core.errors import SteerdeskError
from steerdesk.core.generate import SamplingSettings, generate
from steerdesk.core.steering import Steer
from steerdesk.core.textgrid import compile_pattern, generation_grid, grid_to_csv, grid_to_json
from steerdesk.core.versus import prompt_vs_vector


@pytest.fixture
def llama(fresh_tiny):
    return fresh_tiny("llama")


def test_grid_rows_equal_separate_runs(llama):
    vecs = random_vectors(llama, scale=3.0)
    sampling = SamplingSettings(max_new_tokens=6)
    prompts = ["hello there", "a much longer prompt about the weather today"]
    rows = generation_grid(llama, vecs, [1, 3], [0.5, 2.0], prompts, sampling=sampling, batch_rows=5)
    assert len(rows) == 2 + 2 * 2 * 2
    assert [r.layer for r in rows[:2]] == [None, None]
    for r in rows:
        steer = [] if r.layer is None else [Steer(r.layer, vecs[r.layer], r.scale)]
        alone = generate(llama, [r.prompt], steer, sampling=sampling)[0]
        assert alone.text == r.text, (r.layer, r.scale, r.prompt)


def test_keyword_and_regex_counts():
    kw = compile_pattern("ugh, seriously")
    assert len(kw.findall("Ugh. Seriously? ugh!")) == 3 and not kw.findall("ughh")
    rx = compile_pattern(r"\?+", regex=True)
    assert len(rx.findall("what?? no?")) == 2
    with pytest.raises(SteerdeskError, match="regular expression"):
        compile_pattern("(", regex=True)


def test_grid_exports(llama):
    rows = generation_grid(llama, random_vectors(llama), [2], [1.0], ["hi"], pattern=compile_pattern("the"),
                           sampling=SamplingSettings(max_new_tokens=4))
    parsed = list(csv.DictReader(io.StringIO(grid_to_csv(rows))))
    assert [p["layer"] for p in parsed] == ["", "2"] and parsed[1]["matches"].isdigit()
    assert json.loads(grid_to_json(rows))[1]["scale"] == 1.0


def test_prompt_vs_vector_conditions(llama):
    held = Dataset([Example("Hi?", "Hello, how can I help?", "Ugh, what now?"),
                    Example("Time?", "It is noon.", "Look at a clock, genius.")], name="h")
    vecs = random_vectors(llama, scale=2.0)
    v = prompt_vs_vector(llama, held, [Steer(2, vecs[2], 1.0)], "Reply rudely.", "How are you?",
                         sampling=SamplingSettings(max_new_tokens=5))
    names = [c.name for c in v.conditions]
    assert names == ["unsteered", "prompt", "vector", "both"]
    un, pr, ve, bo = v.conditions
    assert un.margin_delta == 0.0 and un.fluency_delta == 0.0
    assert pr.margin_delta != 0.0 and ve.margin_delta != 0.0 and bo.margin_delta != 0.0
    # each generation equals the same condition run alone
    alone = generate(llama, ["How are you?"], [Steer(2, vecs[2], 1.0)], system="Reply rudely.",
                     sampling=SamplingSettings(max_new_tokens=5))[0]
    assert bo.text == alone.text
    with pytest.raises(SteerdeskError, match="instruction"):
        prompt_vs_vector(llama, held, [Steer(2, vecs[2], 1.0)], " ", "x")
