"""Vector diagnostics: AUC / d' / consistency / alignment / norms / cosines on known inputs and a model."""

from __future__ import annotations

import math

import pytest
import torch
from tinylm import rude4

from steerdesk.core.datasets import Dataset
from steerdesk.core.diagnostics import cosine_matrix, d_prime, diagnose, diagnose_extraction, diagnose_reads, roc_auc
from steerdesk.core.errors import SteerdeskError
from steerdesk.core.extract import compute_vectors


def test_auc_and_d_prime_on_known_samples():
    neg = torch.tensor([0.0, 1.0, 2.0])
    pos = torch.tensor([3.0, 4.0, 5.0])
    assert roc_auc(neg, pos) == 1.0 and roc_auc(pos, neg) == 0.0
    assert roc_auc(neg, neg) == 0.5  # ties count half
    assert roc_auc(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 3.0])) == 0.75
    assert d_prime(neg, pos) == pytest.approx(3.0)  # gap 3, both variances 1
    assert math.isnan(d_prime(neg[:1], pos))
    assert d_prime(torch.zeros(3), torch.ones(3)) == math.inf


def test_cosine_matrix():
    d = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, 0.0]])
    cos = cosine_matrix(d)
    assert cos[0][0] == pytest.approx(1.0) and cos[0][1] == pytest.approx(0.0) and cos[0][2] == pytest.approx(-1.0)
    assert cos[3][0] is None and cos[0][3] is None
    assert all(cos[i][j] == cos[j][i] for i in range(4) for j in range(4))


def _synthetic(n=20, layers=3, hidden=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, layers, hidden, generator=g)
    shift = torch.zeros(layers, hidden)
    shift[0, 0] = 10.0  # layer 0: a big, consistent shift along axis 0
    shift[1, 1] = 0.01  # layer 1: almost no shift
    noise = torch.zeros(n, layers, hidden)
    noise[:, 2] = torch.randn(n, hidden, generator=g) * 5  # layer 2: differences point anywhere
    target = base + shift + noise
    return base, target


def test_diagnose_reads_on_synthetic_data():
    base, target = _synthetic()
    directions = target.mean(0) - base.mean(0)
    diag = diagnose_reads(directions, base, target)
    assert diag.layers == [0, 1, 2] and diag.paired and diag.n_base == diag.n_target == 20
    assert diag.auc[0] == 1.0 and diag.d_prime[0] > 5
    assert diag.consistency[0] == pytest.approx(1.0, abs=1e-6)  # every pair moves the same way
    assert diag.consistency[1] == pytest.approx(1.0, abs=1e-6)  # (tiny but identical differences)
    assert diag.consistency[2] < 0.6
    assert diag.alignment == [pytest.approx(1.0)] * 3  # mean-diff of the same data
    assert diag.auc[1] < 0.75
    norms = torch.cat([base, target]).norm(dim=-1).mean(0)
    for layer in range(3):
        assert diag.vector_norm[layer] == pytest.approx(float(directions[layer].norm()), rel=1e-6)
        assert diag.relative_norm[layer] == pytest.approx(float(directions[layer].norm() / norms[layer]), rel=1e-6)
        assert diag.cosine[layer][layer] == pytest.approx(1.0)
    assert diag.best_layer() == 0
    table = diag.format_table()
    assert len(table.splitlines()) == 1 + 3 + 1 and "best separation at layer 0" in table


def test_a_flipped_vector_reads_as_anti_aligned():
    base, target = _synthetic()
    diag = diagnose_reads(-(target.mean(0) - base.mean(0)), base, target)
    assert diag.auc[0] == 0.0 and diag.alignment[0] == pytest.approx(-1.0)


def test_unpaired_and_degenerate_inputs():
    base, target = _synthetic()
    directions = target.mean(0) - base.mean(0)
    directions[1] = 0.0
    diag = diagnose_reads(directions, base[:5], target)
    assert not diag.paired and diag.consistency == [None, None, None]
    assert diag.auc[1] is None and diag.alignment[1] is None and diag.cosine[1][0] is None
    d = diag.to_dict()
    assert set(d) >= {"auc", "d_prime", "consistency", "alignment", "relative_norm", "cosine", "layers"}
    with pytest.raises(SteerdeskError):
        diagnose_reads(directions[:2], base, target)


RUDE = rude4()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_diagnose_on_a_model_matches_the_extraction(tiny):
    vs = compute_vectors(tiny, RUDE, keep_reads=True)
    from_reads = diagnose_extraction(vs)
    from_model = diagnose(tiny, vs, RUDE)
    for key in ("auc", "d_prime", "consistency", "alignment", "vector_norm"):
        for a, b in zip(getattr(from_reads, key), getattr(from_model, key)):
            assert a == pytest.approx(b, abs=1e-4), key
    # The training set read back through the model: mean-diff vectors align exactly with it.
    assert all(a == pytest.approx(1.0, abs=1e-5) for a in from_model.alignment)
    # Typical norms come from the reads; they agree with the vector file's norms (read 'last').
    assert from_model.typical_norm == pytest.approx(vs.norms.tolist(), rel=1e-4)
    assert len(from_model.cosine) == tiny.info.num_layers
    assert from_model.read_position == "last" and from_model.dataset_name == "rude4"


@pytest.mark.parametrize("arch", ["llama"])
def test_diagnose_errors(tiny):
    vs = compute_vectors(tiny, RUDE)
    with pytest.raises(SteerdeskError, match="keep_reads"):
        diagnose_extraction(vs)
    with pytest.raises(SteerdeskError):
        diagnose(tiny, vs, Dataset([], name="empty"))
