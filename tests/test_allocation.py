"""Layer-wise allocation: exact averages, OWL's and ATP's formulas, ATP's beta range and search."""
from __future__ import annotations

import pytest
import torch

import sparse_runtime as sr
from sparse_runtime.allocation import (ALLOCATIONS, atp_beta_max, atp_rates, beta_candidates, check_beta,
                                       outlier_ratio, owl_rates, weighted_mean)
from sparse_runtime.errors import ConfigError
from sparse_runtime.prune import PruneConfig, heldout_ids, prune_model


def test_registry():
    assert ALLOCATIONS.names() == ["atp", "owl", "uniform"]


@pytest.mark.parametrize("S, L", [(0.5, 2), (0.7, 30), (0.6, 32), (0.8, 7)])
def test_atp_schedule_is_eq10_and_averages_exactly(S, L):
    bmax = atp_beta_max(S, [1.0] * L)
    assert bmax == pytest.approx(min(2 * S / (L - 1), 2 * (1 - S) / (L - 1)), rel=1e-12)
    for beta in (bmax / 3, bmax):
        rates = atp_rates(S, beta, L=L)
        ref = [S - beta * (L - 1) / 2 + beta * (i - 1) for i in range(1, L + 1)]  # Eq. 10
        assert rates == pytest.approx(ref, abs=1e-12)
        assert sum(rates) / L == pytest.approx(S, abs=1e-12)
        assert all(b > a for a, b in zip(rates, rates[1:]))  # monotonically increasing
        assert 0 <= min(rates) and max(rates) <= 1


def test_atp_weighted_blocks_average_exactly():
    w = [3.0, 1.0, 1.0, 2.0, 5.0]
    S = 0.6
    bmax = atp_beta_max(S, w)
    rates = atp_rates(S, bmax * 0.7, w)
    assert weighted_mean(rates, w) == pytest.approx(S, abs=1e-12)
    assert 0 <= min(rates) and max(rates) <= 1
    edge = atp_rates(S, bmax, w)
    assert min(edge) == pytest.approx(0, abs=1e-9) or max(edge) == pytest.approx(1, abs=1e-9)


def test_atp_rejects_invalid_beta_with_a_clear_message():
    L, S = 30, 0.7
    bmax = 0.6 / 29
    check_beta(bmax, S, [1.0] * L)  # the bound itself is legal (as in the official code)
    with pytest.raises(ConfigError) as e:
        check_beta(0.03, S, [1.0] * L)
    msg = str(e.value)
    assert "out of range" in msg and "min(2S/(L-1), 2(1-S)/(L-1))" in msg and f"{bmax:.6g}" in msg
    assert "L=30" in msg and "auto" in msg
    for bad in (0.0, -0.001):
        with pytest.raises(ConfigError, match="out of range"):
            check_beta(bad, S, [1.0] * L)


def test_beta_candidates():
    assert beta_candidates(0.01, 4) == pytest.approx([0.002, 0.004, 0.006, 0.008])
    assert beta_candidates(0.0193548, step=0.002) == pytest.approx([0.002 * k for k in range(1, 10)])  # paper: 9 trials


def test_owl_formula_and_exact_average():
    lod = [1.0, 3.0, 2.0, 5.0, 4.0]
    S, lam = 0.7, 0.08
    rates = owl_rates(lod, S, lam)
    d = [(x - 1.0) / 4.0 * 2 * lam for x in lod]
    ref = [1 - (x - sum(d) / len(d) + (1 - S)) for x in d]  # docs/methods.md#owl
    assert rates == pytest.approx(ref, abs=1e-12)
    assert sum(rates) / len(rates) == pytest.approx(S, abs=1e-12)
    assert max(rates) - min(rates) == pytest.approx(2 * lam)
    assert rates[3] == min(rates) and rates[0] == max(rates)  # more outliers -> lower sparsity
    assert owl_rates([2.0, 2.0], 0.5, 0.08) == [0.5, 0.5]  # no spread -> uniform
    w = [1.0, 2.0, 3.0, 1.0, 1.0]
    assert weighted_mean(owl_rates(lod, S, lam, w), w) == pytest.approx(S, abs=1e-12)


def test_outlier_ratio_reference():
    a = torch.tensor([1.0] * 98 + [100.0, 200.0])
    mean = float(a.mean())
    assert outlier_ratio(a, 5) == pytest.approx(100 * float((a > 5 * mean).sum()) / 100)
    assert outlier_ratio(a, 1) == pytest.approx(2.0)


def _weighted_target(r, model):
    lin = dict(sr.family_of(model).iter_linears(model))
    n = sum(lin[k].weight.numel() for k in r.targets)
    return sum(r.targets[k] * lin[k].weight.numel() for k in r.targets) / n


@pytest.mark.parametrize("allocation, extra", [("uniform", {}), ("owl", {"owl_lambda": 0.1}),
                                               ("atp", {"atp_beta": 0.2})])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_allocation_with_every_method_averages_exactly(allocation, extra, method):
    model = sr.tiny_model("llama", 0)
    cfg = PruneConfig(method=method, sparsity=0.6, allocation=allocation, protocol="test", **extra)
    r = prune_model(model, sr.models.ByteTokenizer(), cfg)
    assert _weighted_target(r, model) == pytest.approx(0.6, abs=1e-12)
    assert r.sparsity_target == pytest.approx(0.6, abs=1e-12)
    rates = list(r.block_rates.values())
    if allocation == "atp":
        assert rates == pytest.approx([0.5, 0.7])
    if allocation == "owl":
        assert max(rates) - min(rates) == pytest.approx(0.2) and "lod" in r.allocation_info
    # within a block every linear shares the rate; measured follows it up to per-row flooring
    for name, t in r.targets.items():
        assert abs(r.measured[name] - t) < 0.02, name


def test_owl_unequal_blocks_average_exactly_weighted():
    model = sr.tiny_model("llama", 0)
    cfg = PruneConfig(method="wanda", sparsity=0.5, allocation="owl", owl_lambda=0.1, protocol="test",
                      exclude=["model.layers.0.mlp.*"])  # block 0 is now much smaller than block 1
    r = prune_model(model, sr.models.ByteTokenizer(), cfg)
    assert _weighted_target(r, model) == pytest.approx(0.5, abs=1e-12)


def test_atp_auto_searches_on_heldout_data_not_the_test_set(monkeypatch):
    import sparse_runtime.data.text as text
    import sparse_runtime.eval.perplexity as ppl

    def no_test_set(*a, **k):
        raise AssertionError("ATP's beta search must not read the WikiText-2 test split")

    monkeypatch.setattr(text, "wikitext2_text", no_test_set)
    monkeypatch.setattr(ppl, "wikitext2_perplexity", no_test_set)
    model = sr.tiny_model("llama", 0)
    tok = sr.models.ByteTokenizer()
    cfg = PruneConfig(method="wanda", sparsity=0.6, allocation="atp", protocol="test", atp_candidates=3,
                      atp_heldout_windows=2)
    r = prune_model(model, tok, cfg)
    info = r.allocation_info
    assert info["beta"] in [pytest.approx(b) for b in beta_candidates(info["beta_max"], 3)]
    scores = info["search"]["scores"]
    assert len(scores) == 3 and min(scores.values()) == scores[f"{info['beta']:.6g}"]
    assert info["search"]["heldout"] == "wikitext2-valid"
    # the chosen candidate's weights are what the model holds
    assert list(r.block_rates.values()) == pytest.approx(atp_rates(0.6, info["beta"], L=2))
    # C4 held-out windows come from a different seed than calibration
    cfg_c4 = PruneConfig(method="wanda", sparsity=0.6, allocation="atp", protocol="test", atp_heldout="c4",
                         atp_heldout_windows=2)
    ids, seqlen = heldout_ids(tok, cfg_c4)
    calib = text.c4_windows(tok, 4, 32, 0)
    assert ids.numel() == 2 * seqlen and not torch.equal(ids[:32], calib[0])


def test_heldout_wikitext_valid_is_not_the_test_split(data_dir):
    tok = sr.models.ByteTokenizer()
    ids, seqlen = heldout_ids(tok, PruneConfig(sparsity=0.5, allocation="atp", protocol="test", atp_heldout_windows=3))
    valid_start = (data_dir / "wikitext-2/tokens_pytorch_examples/valid.txt").read_text()[:96]
    assert tok.decode(ids) == valid_start and ids.numel() == 3 * seqlen
