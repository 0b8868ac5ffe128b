"""The one parser of layer lists, scale lists and named layer sets (core/parsing.py)."""

from __future__ import annotations

import pytest
import torch

from steerdesk.core.errors import SteerdeskError
from steerdesk.core.parsing import check_layers, format_ranges, parse_layers, parse_scales, parse_sets


def test_parse_layers():
    assert parse_layers("12,15") == [12, 15]
    assert parse_layers("10-12, 3") == [3, 10, 11, 12]
    assert parse_layers("3,3,2") == [2, 3]
    for bad, match in [("", "No layers"), ("a", "Cannot read"), ("5-3", "backwards")]:
        with pytest.raises(SteerdeskError, match=match):
            parse_layers(bad)
    with pytest.raises(SteerdeskError, match="out of range"):
        parse_layers("0-30", num_layers=30)


def test_parsers():
    assert parse_scales("0, 0.5,1,2,1") == [0.0, 0.5, 1.0, 2.0]
    assert parse_sets("mid=1-2; late=3", 4) == {"mid": [1, 2], "late": [3]}
    for bad in ("a", "", "1,inf"):
        with pytest.raises(SteerdeskError):
            parse_scales(bad)
    with pytest.raises(SteerdeskError):
        parse_sets("nolayers", 4)
    with pytest.raises(SteerdeskError):
        parse_sets("x=9", 4)


def test_messages_are_the_ones_users_see():
    with pytest.raises(SteerdeskError, match=r"^Layer 9 is out of range: the model has layers 0-3\.$"):
        parse_layers("9", 4)
    with pytest.raises(SteerdeskError, match=r"^Layer range '2-1' is backwards\.$"):
        parse_layers("2-1")
    with pytest.raises(SteerdeskError, match=r"^Cannot read scales '1,a': use a list like 0,0.5,1,2\.$"):
        parse_scales("1,a")
    with pytest.raises(SteerdeskError, match=r"^Cannot read layer set 'bad': use NAME=LAYERS, e\.g\. mid=12-15\.$"):
        parse_sets("bad")
    with pytest.raises(SteerdeskError, match="has no name"):
        parse_sets("=1-2")
    with pytest.raises(SteerdeskError, match=r"^Scale nan is not a finite number\.$"):
        parse_scales("0,nan")


def test_negative_scales_and_order():
    assert parse_scales("-2,0,2,-2") == [-2.0, 0.0, 2.0]
    assert parse_scales("-.5, 1e-3") == [-0.5, 0.001]
    assert parse_sets("") == {} and parse_sets(" ; ") == {}
    assert list(parse_sets("b=2;a=1")) == ["b", "a"]


def test_check_layers_one_message_for_model_and_vectors():
    check_layers([0, 3], 4)
    with pytest.raises(SteerdeskError, match=r"^Layer -1 is out of range: the model has layers 0-3\.$"):
        check_layers([0, -1], 4)
    with pytest.raises(SteerdeskError, match=r"^Layer 4 is out of range: the vectors cover layers 0-3\.$"):
        check_layers([4], 4, of="vectors")


def test_every_range_check_uses_the_same_message():
    """Steer.check, steers_for, VectorSet.require_layers: the parsing module's check and wording."""
    from steerdesk.core.steering import Steer, steers_for
    from steerdesk.core.vectors import VectorSet

    with pytest.raises(SteerdeskError, match=r"^Layer 5 is out of range: the model has layers 0-3\.$"):
        Steer(layer=5, vector=torch.zeros(8)).check(4, 8)
    with pytest.raises(SteerdeskError, match=r"^Layer 4 is out of range: the vectors cover layers 0-3\.$"):
        steers_for(torch.zeros(4, 8), [4])
    with pytest.raises(SteerdeskError, match=r"^Layer 7 is out of range: the vectors cover layers 0-3\.$"):
        VectorSet(torch.ones(4, 8), torch.ones(4)).require_layers([7])


def test_format_ranges():
    assert format_ranges([1, 2, 3, 7]) == "1-3, 7"
    assert format_ranges([5, 0, 5]) == "0, 5"
    assert format_ranges([]) == ""
    assert parse_layers(format_ranges([0, 2, 3, 4, 9]).replace(" ", "")) == [0, 2, 3, 4, 9]


# ------------------------------------------------- which answer tokens a window steers (issue 15, UI)

def _measured_steered_tokens(lm, positions, prompt, layer=1, scale=3.0, new_tokens=8):
    """The generated tokens whose producing hidden state at ``layer`` is shifted by the steering: the
    steered run's per-token projections minus an unsteered teacher-forced forward over the same tokens."""
    from tinylm import strong_vectors

    from steerdesk.core.generate import SamplingSettings, encode_prompts, generate
    from steerdesk.core.steering import Steering, steers_for

    v = strong_vectors(lm, factor=2.0)
    steers = steers_for(v, [layer], scale=scale, normalize=True, positions=positions)
    res = generate(lm, [prompt], steers, sampling=SamplingSettings(max_new_tokens=new_tokens), watch=v)[0]
    ids = encode_prompts(lm, [prompt])["input_ids"]
    full = torch.cat([ids, torch.tensor([res.token_ids], device=ids.device)], 1)
    seen = {}
    with torch.inference_mode(), Steering(lm, [], observe=lambda _l, h: seen.update(h=h.clone()), watch=[layer]):
        lm.model(input_ids=full)
    width = ids.shape[1]
    unit = (v[layer] / v[layer].norm()).float()
    plain = (seen["h"][0, width - 1: width - 1 + len(res.token_ids)].float() @ unit).tolist()
    shifted = []
    for k, p in enumerate(plain):
        d = res.projections[k][layer] - p
        assert d == pytest.approx(scale, abs=1e-3) or d == pytest.approx(0.0, abs=1e-3), (k, d)
        if abs(d) > scale / 2:
            shifted.append(k)
    return shifted, len(res.token_ids), width


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", "first:1", "first:3", "gen:2-4", "gen:5-",
                                       "gen:6-20", "prompt:0-2", "prompt:LAST", "prompt:0-LAST"])
def test_steered_tokens_match_the_measured_shift(tiny, positions):
    """TokenWindow.steered_tokens (what the window's heatmap marks) == the tokens a real steered
    generation shifts (measured as in tests/core/test_windows.py, independently of the function)."""
    from tinylm import PROMPT

    from steerdesk.core.generate import encode_prompts
    from steerdesk.core.parsing import parse_positions

    last = encode_prompts(tiny, [PROMPT])["input_ids"].shape[1] - 1
    positions = positions.replace("LAST", str(last))
    if positions == f"prompt:{last}":
        positions = f"prompt:{last}-{last}"
    shifted, n, width = _measured_steered_tokens(tiny, positions, PROMPT)
    assert n == 8, "the test needs every token"
    assert parse_positions(positions).steered_tokens(n, prompt_length=width) == shifted


def test_steered_tokens_by_the_convention_without_a_model():
    from steerdesk.core.parsing import TokenWindow, parse_positions

    assert parse_positions("first:3").steered_tokens(10) == [0, 1, 2]
    assert parse_positions("first:3").steered_tokens(2) == [0, 1]  # a short answer: only what exists
    assert parse_positions("gen:4-").steered_tokens(6) == [4, 5]
    assert parse_positions("gen:7-9").steered_tokens(5) == []
    assert parse_positions("generated").steered_tokens(3) == [1, 2]
    assert parse_positions("prompt").steered_tokens(0) == []
    assert parse_positions("prompt:2-9").steered_tokens(4, prompt_length=10) == [0]
    assert parse_positions("prompt:2-8").steered_tokens(4, prompt_length=10) == []
    with pytest.raises(SteerdeskError, match="prompt's length"):
        TokenWindow("prompt_window", 0, 3).steered_tokens(4)
    with pytest.raises(SteerdeskError, match="cannot have -1 tokens"):
        parse_positions("all").steered_tokens(-1)
