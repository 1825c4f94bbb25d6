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
    assert ALLOCATIONS.names() == ["atp", "owl", "rmi", "uniform"]


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


def test_rmi_is_an_allocation_for_one_shot_pruning_too():
    """LoSA's RMI + LP through the registry: the reference is the same formulas on the DENSE model's
    block outputs (Gram matrices of the first ``samples`` windows), the LP's box and exact mean."""
    from sparse_runtime.allocation.rmi import GramCollector, cka_matrix, lp_allocate, rmi_importance
    from sparse_runtime.calibration import sequential_pass
    from sparse_runtime.data.text import c4_windows
    from sparse_runtime.models.family import family_of

    model = sr.tiny_model("llama", 0)
    cfg = PruneConfig(method="wanda", sparsity=0.6, allocation="rmi", protocol="test",
                      allocation_options={"delta": 0.05, "samples": 4})
    c = cfg.calibration()
    ids = c4_windows(sr.models.ByteTokenizer(), c["nsamples"], c["seqlen"], c["seed"], None)
    col = GramCollector("outputs")
    sequential_pass(model, family_of(model), ids[:4], None, needs=(), on_block_end=col)
    imp, _ = rmi_importance(cka_matrix([col.grams[b] for b in sorted(col.grams)]))
    r = prune_model(model, sr.models.ByteTokenizer(), cfg, calib_ids=ids)
    rates = list(r.block_rates.values())
    assert rates == pytest.approx(lp_allocate(imp, 0.6, 0.05), abs=1e-12)
    assert r.allocation_info["delta"] == 0.05 and r.allocation_info["importance"] == pytest.approx(imp)
    assert _weighted_target(r, model) == pytest.approx(0.6, abs=1e-12)
    assert all(0.55 - 1e-12 <= x <= 0.65 + 1e-12 for x in rates)
    with pytest.raises(ConfigError, match="samples"):
        prune_model(sr.tiny_model("llama", 0), sr.models.ByteTokenizer(),
                    PruneConfig(method="wanda", sparsity=0.6, allocation="rmi", protocol="test",
                                allocation_options={"samples": 1}))


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


def _official_owl_reference(model, ids, m: float, sparsity: float, lam: float):
    """A plain transcription of luuyin/OWL ``prune_wanda_outlier``'s pass 1 (docs/methods.md#owl):
    Wanda's running ``scaler_row`` per linear on the DENSE model (one window at a time; with nothing
    pruned, the sequential propagation is the plain forward), the block's |W| sqrt(scaler_row)
    concatenated, ``check_outlier_mean`` at M, then the numpy normalisation of the official code."""
    import numpy as np
    from torch import nn

    rows: dict[str, list] = {}

    def hook(name):
        def add_batch(_, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).t().float()
            state = rows.setdefault(name, [torch.zeros(x.shape[0]), 0])
            state[0] *= state[1] / (state[1] + 1)
            state[1] += 1
            state[0] += torch.norm(x, p=2, dim=1) ** 2 / state[1]
        return add_batch

    layers = model.model.layers
    handles = [lin.register_forward_hook(hook(f"{i}.{n}")) for i, layer in enumerate(layers)
               for n, lin in layer.named_modules() if isinstance(lin, nn.Linear)]
    with torch.no_grad():
        for j in range(ids.shape[0]):
            model(ids[j:j + 1], use_cache=False)
    for h in handles:
        h.remove()
    lod = []
    for i, layer in enumerate(layers):
        metric = torch.cat([torch.flatten(lin.weight.data.abs() * torch.sqrt(rows[f"{i}.{n}"][0].reshape(1, -1)))
                            for n, lin in layer.named_modules() if isinstance(lin, nn.Linear)])
        lod.append(float((metric > torch.mean(metric) * m).sum().item()) / metric.numel() * 100)
    a = np.array(lod)
    a = (a - a.min()) * (1 / (a.max() - a.min()) * lam * 2)
    a = a - np.mean(a) + (1 - sparsity)
    return lod, [float(1 - x) for x in a]


def test_owl_matches_the_official_code_on_a_tiny_model():
    """Our LOD per block and per-block sparsities equal the official code's (pass 1 on the dense
    model, per-block concatenation, mean-based threshold, [-lambda, lambda] around 1 - S)."""
    from sparse_runtime.data.text import c4_windows

    model = sr.tiny_model("llama", 0, num_hidden_layers=4)
    cfg = PruneConfig(method="wanda", sparsity=0.7, allocation="owl", protocol="test",
                      allocation_options={"m": 3.0, "lam": 0.08})
    c = cfg.calibration()
    ids = c4_windows(sr.models.ByteTokenizer(), c["nsamples"], c["seqlen"], c["seed"], None)
    lod_ref, rates_ref = _official_owl_reference(model, ids, 3.0, 0.7, 0.08)
    assert len(set(lod_ref)) == len(lod_ref)  # a spread to allocate from, not a degenerate case
    r = prune_model(model, sr.models.ByteTokenizer(), cfg, calib_ids=ids)
    assert r.allocation_info["lod"] == pytest.approx(lod_ref, abs=1e-9)
    assert list(r.block_rates.values()) == pytest.approx(rates_ref, abs=1e-12)
