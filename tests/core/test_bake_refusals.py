"""What bake refuses, and why: inexact recipes, unknown layouts, bad folders, a full disk, foreign vectors.

``test_naive_projection_fold_is_not_exact`` justifies refusing ``project`` / ``clamp``: folding
the projection into every residual writer up to block L (the construction issue 14 suggested)
does remove the direction from the stream, but the blocks before L then read a different stream
through their norms, and the model's output is far from the hooked model's.
"""

from __future__ import annotations

import errno
import threading

import pytest
import torch
from tinylm import strong_vectors

from steerdesk.core.bake import bake, plan_bake
from steerdesk.core.errors import Cancelled, SteerdeskError
from steerdesk.core.steering import Steer, Steering, steers_for
from steerdesk.core.vectors import VectorSet

IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 198, 42, 7]])


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize("mode", ["project", "clamp"])
def test_project_and_clamp_are_refused(tiny, mode, tmp_path):
    steers = steers_for(strong_vectors(tiny), [1], scale=1.0, mode=mode)
    with pytest.raises(SteerdeskError, match=f"'{mode}' steering cannot be baked exactly") as info:
        bake(tiny, steers, tmp_path / "out")
    assert "norms" in _one_line(info.value)
    assert list(tmp_path.iterdir()) == []


def test_project_at_scale_zero_is_identity_and_skipped(fresh_tiny, tmp_path):
    lm = fresh_tiny("llama")
    v = strong_vectors(lm)
    plan = plan_bake(lm, [Steer(1, v[1], 0.0, mode="project"), Steer(2, v[2], 1.0)])
    assert plan.layers == (2,)


def test_naive_projection_fold_is_not_exact(fresh_tiny):
    """P = I - v^v^T applied to the embedding and to every attention / MLP output projection of
    blocks 0..L: the stream after block L has no v^ component (as with the hook), yet the logits
    differ from the hooked model's by far more than 1e-4 -- blocks 0..L read P-projected inputs
    through RMSNorm, which does not commute with P."""
    lm = fresh_tiny("llama")
    layer = 2
    v = strong_vectors(lm)[layer]
    unit = v / v.norm()
    P = torch.eye(unit.numel()) - torch.outer(unit, unit)
    steers = [Steer(layer, v, 1.0, mode="project")]
    with torch.inference_mode(), Steering(lm, steers):
        out = lm.model(input_ids=IDS, output_hidden_states=True)
        hooked_logits, hooked_h = out.logits.clone(), out.hidden_states[layer + 1].clone()
    # The hooked stream after block L has no v^ component.
    assert float((hooked_h @ unit).abs().max()) < 1e-4

    import copy

    naive = copy.deepcopy(lm.model)
    with torch.no_grad():
        naive.model.embed_tokens.weight.copy_(naive.model.embed_tokens.weight @ P)
        for block in naive.model.layers[: layer + 1]:
            for linear in (block.self_attn.o_proj, block.mlp.down_proj):
                linear.weight.copy_(P @ linear.weight)
    with torch.inference_mode():
        out = naive(input_ids=IDS, output_hidden_states=True)
    naive_logits, naive_h = out.logits, out.hidden_states[layer + 1]
    assert float((naive_h @ unit).abs().max()) < 1e-4  # the fold does remove the direction...
    assert float((naive_h - hooked_h).abs().max()) > 1e-3  # ...but the stream is another one (measured 0.010)
    assert float((naive_logits - hooked_logits).abs().max()) > 1e-2  # far beyond 1e-4 (measured 0.070)


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_positions_other_than_all_are_refused(fresh_tiny, positions, tmp_path):
    lm = fresh_tiny("llama")
    steers = steers_for(strong_vectors(lm), [1], positions=positions)
    with pytest.raises(SteerdeskError, match="positions 'all'"):
        bake(lm, steers, tmp_path / "out")


def test_per_row_steering_is_refused(fresh_tiny, tmp_path):
    lm = fresh_tiny("llama")
    steers = steers_for(strong_vectors(lm), [1])
    with pytest.raises(SteerdeskError, match="Per-row steering"):
        bake(lm, [steers, []], tmp_path / "out")  # type: ignore[arg-type]


def test_nothing_to_bake_is_refused(fresh_tiny, tmp_path):
    lm = fresh_tiny("llama")
    with pytest.raises(SteerdeskError, match="Nothing to bake"):
        bake(lm, [], tmp_path / "out")
    with pytest.raises(SteerdeskError, match="scale 0"):
        bake(lm, steers_for(strong_vectors(lm), [1, 2], scale=0.0), tmp_path / "out")


def test_gemma2_is_refused_with_the_reason(fresh_tiny, tmp_path):
    lm = fresh_tiny("gemma2")
    with pytest.raises(SteerdeskError, match="norm follows each residual writer"):
        bake(lm, steers_for(strong_vectors(lm), [1]), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_unknown_family_is_refused(tokenizer, tmp_path):
    import transformers as T

    from steerdesk.core.models import wrap_model

    cfg = T.GemmaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    lm = wrap_model(T.AutoModelForCausalLM.from_config(cfg).eval(), tokenizer, name="tiny-gemma")
    with pytest.raises(SteerdeskError, match="Cannot bake gemma"):
        bake(lm, steers_for(torch.randn(2, 64), [1]), tmp_path / "out")
    cfg = T.OPTConfig(vocab_size=len(tokenizer), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                      num_attention_heads=4, word_embed_proj_dim=64)
    lm = wrap_model(T.AutoModelForCausalLM.from_config(cfg).eval(), tokenizer, name="tiny-opt")
    with pytest.raises(SteerdeskError, match="does not know which bias"):
        bake(lm, steers_for(torch.randn(2, 64), [1]), tmp_path / "out")


def test_phi3_partial_rotary_is_refused(fresh_tiny, tmp_path):
    lm = fresh_tiny("phi3")
    rope = lm.model.config.rope_parameters
    old = rope.get("partial_rotary_factor")
    rope["partial_rotary_factor"] = 0.5
    try:
        with pytest.raises(SteerdeskError, match="partial_rotary_factor"):
            bake(lm, steers_for(strong_vectors(lm), [1]), tmp_path / "out")
    finally:
        rope["partial_rotary_factor"] = old


def test_existing_folder_is_refused_unless_force(fresh_tiny, tmp_path):
    lm = fresh_tiny("gpt2")
    steers = steers_for(strong_vectors(lm), [1])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SteerdeskError, match=r"already exists.*--force"):
        bake(lm, steers, out)
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces an earlier bake or an empty folder, never a folder of the user's own files.
    with pytest.raises(SteerdeskError, match="not a steerdesk bake"):
        bake(lm, steers, out, force=True)
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    bake(lm, steers, out, force=True)  # empty: replaced
    (out / "extra.txt").write_text("left by the user in the old bake")
    bake(lm, steers, out, force=True)  # an earlier bake: replaced whole
    assert not (out / "extra.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or set-aside folder left
    (tmp_path / "file").write_text("x")
    with pytest.raises(SteerdeskError, match="not a folder"):
        bake(lm, steers, tmp_path / "file", force=True)
    with pytest.raises(SteerdeskError, match="does not exist"):
        bake(lm, steers, tmp_path / "missing" / "out")


def test_source_folder_is_refused(fresh_tiny, tmp_path):
    from dataclasses import replace

    lm = fresh_tiny("gpt2")
    (tmp_path / "src").mkdir()
    lm = replace(lm, info=replace(lm.info, source=str(tmp_path / "src")))
    with pytest.raises(SteerdeskError, match="loaded from"):
        bake(lm, steers_for(strong_vectors(lm), [1]), tmp_path / "src", force=True)


def _full_disk(monkeypatch):
    """Saving weights writes part of a file, then the disk is full."""
    import transformers.modeling_utils as mu

    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mu, "safe_save_file", save_file)


def test_disk_full_leaves_nothing_behind(fresh_tiny, tmp_path, monkeypatch):
    lm = fresh_tiny("llama")
    steers = steers_for(strong_vectors(lm), [1])
    _full_disk(monkeypatch)
    with pytest.raises(SteerdeskError, match="disk is full") as info:
        bake(lm, steers, tmp_path / "out")
    _one_line(info.value)
    assert list(tmp_path.iterdir()) == []
    # With --force over an existing bake, the old folder survives a failed write.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    (tmp_path / "old" / "steerdesk_bake.json").write_text("{}")
    with pytest.raises(SteerdeskError, match="disk is full"):
        bake(lm, steers, tmp_path / "old", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert (tmp_path / "old" / "config.json").read_text() == "{}"


def test_working_folder_is_refused_even_with_force(fresh_tiny, tmp_path, monkeypatch):
    lm = fresh_tiny("gpt2")
    steers = steers_for(strong_vectors(lm), [1])
    work = tmp_path / "project"
    work.mkdir()
    (work / "steerdesk_bake.json").write_text("{}")  # even a folder that looks like a bake
    monkeypatch.chdir(work)
    for out in (".", str(work), ".."):
        with pytest.raises(SteerdeskError, match="working folder"):
            bake(lm, steers, out, force=True)
    assert sorted(p.name for p in work.iterdir()) == ["steerdesk_bake.json"]


def test_baked_folder_and_files_are_readable_by_others(fresh_tiny, tmp_path):
    import os
    import stat

    lm = fresh_tiny("llama")
    old = os.umask(0o022)
    try:
        out = bake(lm, steers_for(strong_vectors(lm), [1]), tmp_path / "out").out_dir
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_cancel_leaves_nothing_behind(fresh_tiny, tmp_path):
    lm = fresh_tiny("llama")
    stop = threading.Event()
    seen: list[str] = []

    def progress(done: int, total: int, msg: str) -> None:
        seen.append(msg)
        if msg.startswith("Writing"):
            stop.set()

    with pytest.raises(Cancelled):
        bake(lm, steers_for(strong_vectors(lm), [1]), tmp_path / "out", progress=progress, cancel=stop)
    assert list(tmp_path.iterdir()) == [] and len(seen) == 4


def test_vectors_for_another_model_are_refused(fresh_tiny, tmp_path):
    lm = fresh_tiny("llama")
    other = VectorSet(directions=torch.randn(lm.info.num_layers, lm.info.hidden_size),
                      norms=torch.ones(lm.info.num_layers),
                      metadata={"model": "tiny-gpt2", "architecture": "GPT2LMHeadModel"})
    with pytest.raises(SteerdeskError, match="made for tiny-gpt2"):
        bake(lm, other.steers([1]), tmp_path / "out", vectors=other)
    wrong_size = VectorSet(directions=torch.randn(lm.info.num_layers, 32), norms=torch.ones(lm.info.num_layers))
    with pytest.raises(SteerdeskError, match="hidden size"):
        bake(lm, wrong_size.steers([1]), tmp_path / "out", vectors=wrong_size)
    assert list(tmp_path.iterdir()) == []


def test_bake_job_plans_runs_with_progress_and_refuses_foreign_vectors(fresh_tiny, tmp_path):
    """The job a panel calls: plan() up front (no writes), run() with progress, same refusals."""
    from steerdesk import jobs
    from steerdesk.jobs.bake import plan

    lm = fresh_tiny("mistral")
    vs = VectorSet(directions=strong_vectors(lm), norms=torch.ones(lm.info.num_layers),
                   metadata={"model": "tiny-mistral", "architecture": lm.info.architecture})
    spec = jobs.BakeSpec(jobs.SteeringSpec(vectors=vs, layers=(1, 3), scale=0.5, normalize=True),
                         out_dir=str(tmp_path / "out"))
    p = plan(lm, spec)
    assert p.target_model_type == "llama" and p.re_expressed and p.layers == (1, 3)
    assert list(tmp_path.iterdir()) == []
    seen: list[tuple[int, int, str]] = []
    result = jobs.run(lm, spec, jobs.JobContext(on_progress=lambda d, t, m: seen.append((d, t, m))))
    assert result.out_dir == tmp_path / "out" and (tmp_path / "out" / "config.json").is_file()
    assert [d for d, _, _ in seen] == [0, 1, 2, 3, 4] and all(t == 4 for _, t, _ in seen)
    assert result.metadata["normalize"] is True and result.metadata["vector"]["directions_sha256"]
    assert jobs.record(lm, spec, result) is None  # the record is the metadata inside the checkpoint
    foreign = VectorSet(directions=vs.directions, norms=vs.norms,
                        metadata={"model": "other", "architecture": "GPT2LMHeadModel"})
    bad = jobs.BakeSpec(jobs.SteeringSpec(vectors=foreign, layers=(1,)), out_dir=str(tmp_path / "o2"))
    with pytest.raises(SteerdeskError, match="made for other"):
        plan(lm, bad)
    with pytest.raises(SteerdeskError, match="made for other"):
        jobs.run(lm, bad)
    assert not (tmp_path / "o2").exists()
