"""core/kernels.py: oneDNN linear layers agree with aten's, fall back where they must, and the
steering invariants hold on the stock aten path too (the tiny fixtures run on oneDNN)."""

from __future__ import annotations

import pytest
import torch

from steerdesk.core import kernels
from steerdesk.core.extract import collect, encode
from steerdesk.core.generate import SamplingSettings, generate
from steerdesk.core.kernels import OneDNNLinear, linear_backend, use_cpu_linear
from steerdesk.core.steering import Steering, steers_for
from tinylm import PROMPT, REPLY, build_tiny, ids_of, strong_vectors

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


def test_backend_choice_and_override(monkeypatch):
    assert linear_backend() in ("onednn", "aten")
    first = linear_backend()
    assert linear_backend() == first  # measured once per process
    monkeypatch.setenv(kernels.ENV, "aten")
    assert linear_backend() == "aten"
    monkeypatch.setenv(kernels.ENV, "onednn")
    assert linear_backend() == "onednn"
    lin = torch.nn.Linear(2, 2)
    assert use_cpu_linear(lin) == "onednn" and type(lin) is OneDNNLinear


# ------------------------------------------------- steering invariants on the stock (aten) path

@pytest.fixture(params=["llama", "gptneox"])
def stock(request, tokenizer, plain_tokenizer):
    return build_tiny(request.param, tokenizer, plain_tokenizer, linear="aten")


def test_stock_zero_vector_is_bit_identical(stock):
    ids = ids_of(stock, PROMPT)
    before = _logits(stock, ids)
    zero = torch.zeros(stock.info.num_layers, stock.info.hidden_size)
    with Steering(stock, steers_for(zero, [0, 1, 2, 3], scale=5.0)):
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
