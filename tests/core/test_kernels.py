"""core/kernels.py: oneDNN linear layers agree with aten's, fall back where they must, and the
steering invariants hold on the stock aten path too (the tiny fixtures run on oneDNN)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tinylm import PROMPT, REPLY, build_tiny, ids_of, strong_vectors

from steerdesk.core import kernels
from steerdesk.core.extract import collect, encode
from steerdesk.core.generate import SamplingSettings, generate
from steerdesk.core.kernels import OneDNNLinear, linear_backend, use_cpu_linear
from steerdesk.core.steering import Steering, steers_for

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")

GREEDY = SamplingSettings(max_new_tokens=12)


def _logits(lm, ids):
    with torch.inference_mode():
        return lm.model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2", "gptneox"])
def test_onednn_agrees_with_aten_and_switches_back_exactly(arch, tokenizer, plain_tokenizer):
    lm = build_tiny(arch, tokenizer, plain_tokenizer, linear="aten")
    ids = ids_of(lm, PROMPT + " " + REPLY)
    stock = _logits(lm, ids)
    assert use_cpu_linear(lm.model, "onednn") == "onednn"
    linears = [m for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is OneDNNLinear for m in linears)
    fast = _logits(lm, ids)
    torch.testing.assert_close(fast, stock, rtol=1e-4, atol=1e-4)
    assert use_cpu_linear(lm.model, "aten") == "aten"
    assert not [m for m in lm.model.modules() if type(m) is OneDNNLinear]
    assert torch.equal(_logits(lm, ids), stock)


def test_linear_outputs_match_for_every_input_shape():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 48)
    lin.requires_grad_(False)
    inputs = [torch.randn(s) for s in [(32,), (5, 32), (2, 7, 32), (2, 3, 4, 32), (0, 32)]]
    inputs.append(torch.randn(4, 9, 32).transpose(0, 1))  # non-contiguous
    expected = [lin(x) for x in inputs]
    use_cpu_linear(lin, "onednn")
    assert type(lin) is OneDNNLinear
    for x, want in zip(inputs, expected):
        got = lin(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="dtype"):  # the stock forward's own error, not oneDNN's
        lin(torch.randn(3, 32, dtype=torch.float64))


def test_onednn_sees_only_a_fixed_set_of_row_counts(monkeypatch):
    """oneDNN keeps memory per input shape: decoding row counts go as they are, anything larger
    in blocks of at most CHUNK rows padded to a size from SIZES; the numbers are unchanged."""
    calls: list[int] = []
    real = kernels._onednn_linear

    def counting(x, w, b):
        calls.append(x.numel() // x.shape[-1])
        return real(x, w, b)

    monkeypatch.setattr(kernels, "_onednn_linear", counting)
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 5)
    lin.requires_grad_(False)
    stock = torch.nn.Linear(8, 5)
    stock.load_state_dict(lin.state_dict())
    use_cpu_linear(lin, "onednn")
    allowed = set(range(1, kernels.MAX_ROWS + 1)) | set(kernels.SIZES)
    for shape in [(1, 1, 8), (kernels.MAX_ROWS, 8), (17, 8), (3, 40, 8), (2500, 8), (2, 1024, 8), (7, 33, 8)]:
        calls.clear()
        x = torch.randn(shape)
        got = lin(x)
        torch.testing.assert_close(got, stock(x), rtol=1e-5, atol=1e-5)
        assert got.shape == (*shape[:-1], 5)
        assert calls and set(calls) <= allowed, (shape, calls)
    assert calls == [256]  # 231 rows: one block padded to the next size up


def test_switched_layers_survive_dtype_changes_copies_and_pickling(tokenizer, plain_tokenizer):
    import copy
    import pickle

    lm = build_tiny("llama", tokenizer, plain_tokenizer, linear="aten")
    ids = ids_of(lm, PROMPT)[:, :4]  # few rows: the oneDNN path
    use_cpu_linear(lm.model, "onednn")
    fast = _logits(lm, ids)
    for model in (copy.deepcopy(lm.model), pickle.loads(pickle.dumps(lm.model))):
        assert any(type(m) is OneDNNLinear for m in model.modules())
        with torch.inference_mode():
            torch.testing.assert_close(model(input_ids=ids).logits, fast, rtol=0, atol=0)
    lm.model.double()  # weights no longer float32: the stock forward runs, no oneDNN error
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(input_ids=ids).logits.float(), fast, rtol=1e-4, atol=1e-4)
    assert use_cpu_linear(lm.model, "aten") == "aten"  # restores even though none is eligible now
    assert not [m for m in lm.model.modules() if type(m) is OneDNNLinear]


def test_trainable_bias_alone_uses_the_stock_forward():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    lin.weight.requires_grad_(False)
    ref = copy_of(lin)
    use_cpu_linear(lin, "onednn")
    x = torch.randn(2, 8)
    lin(x).sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad)


def copy_of(lin):
    ref = torch.nn.Linear(lin.in_features, lin.out_features)
    ref.load_state_dict(lin.state_dict())
    ref.weight.requires_grad_(lin.weight.requires_grad)
    return ref


def test_autograd_uses_the_stock_forward():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    ref = torch.nn.Linear(8, 4)
    ref.load_state_dict(lin.state_dict())
    use_cpu_linear(lin, "onednn")
    x = torch.randn(3, 8)
    lin(x).square().sum().backward()
    ref(x).square().sum().backward()
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad)


def test_only_plain_float32_cpu_linears_are_switched(tokenizer, plain_tokenizer):
    bf16 = build_tiny("llama", tokenizer, plain_tokenizer, dtype=torch.bfloat16, linear="aten")
    assert use_cpu_linear(bf16.model, "onednn") == ""  # nothing eligible: left alone
    assert not [m for m in bf16.model.modules() if type(m) is OneDNNLinear]

    class Wrapped(torch.nn.Linear):  # e.g. a quantised subclass: its own forward must run
        pass

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), Wrapped(4, 4), torch.nn.Linear(4, 4))
    net[2]._hf_hook = object()  # accelerate-managed (offloading): never touched
    use_cpu_linear(net, "onednn")
    assert [type(m) for m in net] == [OneDNNLinear, Wrapped, torch.nn.Linear]
    with pytest.raises(ValueError):
        use_cpu_linear(torch.nn.Linear(2, 2), "mkl")


@pytest.fixture(autouse=True)
def _decision_file(tmp_path, monkeypatch):
    """Every test here stores kernel decisions in a temporary file, never the user's cache,
    and starts with no decision made in this process."""
    path = tmp_path / "cpu-linear.json"
    monkeypatch.setenv(kernels.CACHE_ENV, str(path))
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels, "_choice", None)
    return path


def test_backend_choice_is_stored_per_machine_and_overridable(monkeypatch, _decision_file):
    first = linear_backend()
    assert first in ("onednn", "aten")
    choice = kernels.linear_choice()
    assert choice.how in ("probed", "probed-busy", "unavailable")  # busy: other processes loaded the CPUs
    if choice.how == "probed-busy":
        assert not _decision_file.exists()  # a probe under load is never stored
    if choice.how == "probed":  # stored under this machine's key, then reused by a new process
        stored = json.loads(_decision_file.read_text())
        assert stored[kernels.machine_key()]["backend"] == first
        monkeypatch.setattr(kernels, "_choice", None)
        again = kernels.linear_choice()
        assert (again.backend, again.how, again.ratio) == (first, "cached", choice.ratio)
    assert linear_backend() == first  # decided once per process
    monkeypatch.setenv(kernels.ENV, "aten")
    assert kernels.linear_choice() == kernels.KernelChoice("aten", "forced", None, f"{kernels.ENV}=aten")
    monkeypatch.setenv(kernels.ENV, "onednn")
    assert linear_backend() == "onednn"
    lin = torch.nn.Linear(2, 2)
    assert use_cpu_linear(lin) == "onednn" and type(lin) is OneDNNLinear


def test_stored_decision_is_used_without_measuring(monkeypatch, _decision_file):
    """A decision stored for this machine's key wins over measuring; one for another key does not."""
    other = kernels.KernelChoice("aten", "probed", 0.5, "stored for another machine")
    kernels.store_decision(_decision_file, "Some Other CPU | torch 0.0 | 64 threads", other)
    mine = kernels.KernelChoice("onednn", "probed", 1.7, "stored here")
    kernels.store_decision(_decision_file, kernels.machine_key(), mine)
    monkeypatch.setattr(kernels, "probe", lambda *a, **k: pytest.fail("measured despite a stored decision"))
    got = kernels.linear_choice()
    assert (got.backend, got.how, got.ratio, got.detail) == ("onednn", "cached", 1.7, "stored here")
    assert "cached" in got.describe() and "1.70x" in got.describe()
    data = json.loads(_decision_file.read_text())
    assert data["Some Other CPU | torch 0.0 | 64 threads"]["backend"] == "aten"  # kept


def test_reprobe_replaces_the_stored_decision(monkeypatch, _decision_file):
    kernels.store_decision(_decision_file, kernels.machine_key(), kernels.KernelChoice("onednn", "probed", 9.0, "old"))
    monkeypatch.setenv(kernels.ENV, "probe")
    monkeypatch.setattr(kernels, "probe", lambda *a, **k: kernels.KernelChoice("aten", "probed", 0.8, "new"))
    assert kernels.linear_choice().detail == "new"
    assert json.loads(_decision_file.read_text())[kernels.machine_key()]["detail"] == "new"


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"%s": {"backend": "mkl"}}'])
def test_corrupt_decision_file_is_measured_again(monkeypatch, _decision_file, content):
    _decision_file.write_text(content.replace("%s", kernels.machine_key()))
    monkeypatch.setattr(kernels, "probe", lambda *a, **k: kernels.KernelChoice("aten", "probed", 1.0, "measured"))
    assert kernels.linear_choice().how == "probed"
    assert json.loads(_decision_file.read_text())[kernels.machine_key()]["backend"] == "aten"


def test_probe_on_a_busy_machine_is_not_stored(monkeypatch, _decision_file):
    """A probe during which other processes used most of the CPUs decides for this process only."""
    monkeypatch.setattr(kernels, "foreign_load", lambda *a: 0.9)
    choice = kernels.linear_choice([torch.randn(64, 32)])
    if choice.how == "unavailable":
        pytest.skip("no oneDNN linear")
    assert choice.how == "probed-busy" and "90%" in choice.detail
    assert not _decision_file.exists()


def test_foreign_load_arithmetic():
    n = os.cpu_count() or 1
    # 2 s wall, all CPUs busy for 2*n CPU-seconds, of which this process used 0.5: the rest is foreign
    assert kernels.foreign_load((100.0, 1.0), (100.0 + 2 * n, 1.5), 2.0) == pytest.approx((2 * n - 0.5) / (2 * n))
    assert kernels.foreign_load((0.0, 0.0), (1.0, 1.0), 1.0) == 0.0  # only our own work
    assert kernels.foreign_load(None, (1.0, 1.0), 1.0) == 0.0  # no /proc/stat: unknown, treated as quiet


def test_machine_key_names_cpu_torch_and_threads():
    key = kernels.machine_key()
    assert kernels.cpu_model() in key and torch.__version__ in key
    assert f"{torch.get_num_threads()} threads" in key


# ------------------------------------------------- decide(): the pure decision rule

def _pairs(aten_ms, onednn_ms):
    return [a / 1e3 for a in aten_ms], [o / 1e3 for o in onednn_ms]


def test_decide_clearly_onednn():
    aten, onednn = _pairs([30, 31, 29, 30, 32, 30, 31, 30], [20, 19, 21, 20, 20, 19, 20, 21])
    backend, ratio, reason = kernels.decide(aten, onednn)
    assert backend == "onednn"
    # median of the per-pair ratios, by hand: sorted 29/21, 30/21, 30/20, 30/20, 31/20, 30/19, 32/20, 31/19
    # -> the middle two are 1.5 and 1.55
    assert ratio == pytest.approx(1.525)
    assert "oneDNN 1.52x faster" in reason or "oneDNN 1.53x faster" in reason


def test_decide_clearly_aten():
    aten, onednn = _pairs([10] * 8, [20, 21, 19, 20, 22, 20, 20, 19])
    backend, ratio, reason = kernels.decide(aten, onednn)
    assert backend == "aten" and ratio == pytest.approx(0.5) and "aten 2.00x faster" in reason


def test_decide_tie_keeps_the_stock_kernel():
    aten, onednn = _pairs([10, 10.2, 9.9, 10.1, 10, 10.3, 9.8, 10], [10.1, 10, 10, 9.9, 10.2, 10, 10, 10.1])
    backend, ratio, reason = kernels.decide(aten, onednn)
    assert backend == "aten" and ratio == pytest.approx(1.0, abs=0.02) and "no clear winner" in reason


def test_decide_small_gain_below_margin_keeps_the_stock_kernel():
    aten, onednn = _pairs([12] * 8, [10] * 8)  # a consistent 1.2x: below the 1.25x margin
    assert kernels.decide(aten, onednn)[0] == "aten"


def test_decide_noisy_keeps_the_stock_kernel():
    """Median above the margin but oneDNN slower in a quarter of the pairs: not decisive."""
    ratios = [2.0, 0.5, 1.8, 0.6, 1.6, 1.5, 1.4, 1.3, 2.2, 1.35, 1.45, 0.7]
    aten, onednn = [r * 0.01 for r in ratios], [0.01] * len(ratios)
    backend, ratio, _ = kernels.decide(aten, onednn)
    assert ratio >= kernels.MARGIN  # the median alone would have picked oneDNN
    assert backend == "aten"


def test_decide_one_outlier_changes_nothing():
    aten, onednn = _pairs([30] * 12, [20] * 12)
    assert kernels.decide(aten, onednn)[0] == "onednn"
    aten_spike = list(aten)
    aten_spike[3] = 0.002  # one aten run hit a quiet instant / timer glitch: a 0.1x pair
    assert kernels.decide(aten_spike, onednn)[:2] == ("onednn", pytest.approx(1.5))
    onednn_spike = list(onednn)
    onednn_spike[5] = 5.0  # the other core was taken during one oneDNN run
    assert kernels.decide(aten, onednn_spike)[:2] == ("onednn", pytest.approx(1.5))
    slow_aten = [0.01] * 12
    slow_aten[0] = 1.0  # one 100x aten pair must not hand the choice to oneDNN
    assert kernels.decide(slow_aten, [0.01] * 12)[0] == "aten"


def test_decide_too_few_pairs_and_bad_input():
    backend, ratio, reason = kernels.decide([0.03] * 3, [0.01] * 3)  # 3x, but only 3 pairs
    assert (backend, ratio) == ("aten", None) and "only 3 timing pairs" in reason
    with pytest.raises(ValueError):
        kernels.decide([0.01] * 6, [0.01] * 5)
    with pytest.raises(ValueError):
        kernels.decide([0.01] * 5 + [0.0], [0.01] * 6)


def test_probe_measures_and_agrees_with_decide(monkeypatch):
    """probe() feeds its interleaved timings to decide(): a real (small) measurement here."""
    seen = {}
    real = kernels.decide

    def spy(aten, onednn, **kw):
        seen["n"] = (len(aten), len(onednn))
        return real(aten, onednn, **kw)

    monkeypatch.setattr(kernels, "decide", spy)
    weights = [torch.randn(64, 32), torch.randn(32, 64)]
    choice = kernels.probe(weights, pairs=kernels.MIN_PAIRS)
    assert choice.how == "probed" and choice.backend in ("aten", "onednn")
    assert seen["n"] == (kernels.MIN_PAIRS, kernels.MIN_PAIRS)


def test_probe_slice_bounds_the_probed_bytes():
    ws = [torch.zeros(1024, 1024) for _ in range(10)]  # 4 MiB each
    assert len(kernels._probe_slice(ws, max_bytes=9 << 20)) == 2
    assert len(kernels._probe_slice(ws[:1], max_bytes=1)) == 1  # always at least one


# ------------------------------------------------- steering invariants on the stock (aten) path

@pytest.fixture(params=["llama", "gptneox"])
def stock(request, tokenizer, plain_tokenizer):
    return build_tiny(request.param, tokenizer, plain_tokenizer, linear="aten")


def test_stock_identity_steering_is_bit_identical(stock):
    """Scale 0 in add mode is the identity (a zero vector at a non-zero scale is now refused)."""
    ids = ids_of(stock, PROMPT)
    before = _logits(stock, ids)
    with Steering(stock, steers_for(strong_vectors(stock, factor=4.0), [0, 1, 2, 3], scale=0.0)):
        assert torch.equal(_logits(stock, ids), before)


@pytest.mark.parametrize("mode", ["add", "project"])
def test_stock_cache_on_equals_off(stock, mode):
    steers = steers_for(strong_vectors(stock, factor=4.0), [1], mode=mode)

    def run(cache):
        return generate(stock, [PROMPT], steers, sampling=GREEDY, use_cache=cache)[0].token_ids

    on = run(True)
    assert on == run(False)
    assert on != generate(stock, [PROMPT], sampling=GREEDY)[0].token_ids


def test_stock_left_and_right_padding_agree(stock):
    pairs = [(PROMPT, REPLY), ("Hi", "Hello there, how are you today?"), ("A much longer question about "
             "rivers, mountains and the sea?", "Yes.")]
    enc = encode(stock, pairs)
    left, _ = collect(stock, enc, padding_side="left", batch_size=3)
    right, _ = collect(stock, enc, padding_side="right", batch_size=3)
    rel = (left - right).norm(dim=-1) / right.norm(dim=-1)
    assert rel.max() < 1e-4
