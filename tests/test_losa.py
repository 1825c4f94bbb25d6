"""LoSA (issue 8): RMI/CKA, the LP allocation, rank allocation, the cubic schedule, the masked
per-layer-rank adapter (merge exactness, rank changes) and the round loop on tiny models."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import sparse_runtime as sr
from sparse_runtime.errors import ConfigError
from sparse_runtime.losa import (LoSAConfig, allocate_ranks, cka, cka_matrix, cubic_sparsity, delta_for, gram,
                                 lp_allocate, rmi_importance, round_rank_budget, run_losa, run_losa_model,
                                 sparsity_schedule, truncate_svd)
from sparse_runtime.allocation.rmi import GramCollector
from sparse_runtime.calibration import BlockInputs


# -- RMI / CKA ------------------------------------------------------------------------------------
def _direct_linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """ITPruner's nHSIC on centred features: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    X = X.reshape(X.shape[0], -1).double()
    Y = Y.reshape(Y.shape[0], -1).double()
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    return float((Yc.t() @ Xc).norm() ** 2 / ((Xc.t() @ Xc).norm() * (Yc.t() @ Yc).norm()))


def test_cka_matches_direct_feature_computation():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 5, 4, generator=g)
    Y = X * 0.5 + 0.3 * torch.randn(6, 5, 4, generator=g)
    Z = torch.randn(6, 5, 4, generator=g)
    for A, B in ((X, Y), (X, Z), (Y, Z)):
        assert cka(gram(A), gram(B)) == pytest.approx(_direct_linear_cka(A, B), rel=1e-10)
    assert cka(gram(X), gram(X)) == pytest.approx(1.0)
    assert cka(gram(X), gram(3.0 * X + 1.0)) == pytest.approx(1.0, abs=1e-9)  # scale and shift invariant
    # Gram from mini-batches equals the Gram of all samples (what the collector keeps)
    assert torch.allclose(gram([X[:2], X[2:]]), gram(X))
    C = cka_matrix([gram(X), gram(Y), gram(Z)])
    assert C[0, 1] == pytest.approx(_direct_linear_cka(X, Y), rel=1e-10) and torch.allclose(C, C.t())


def test_rmi_importance_direct():
    C = torch.tensor([[1.0, 0.9, 0.2], [0.9, 1.0, 0.3], [0.2, 0.3, 1.0]])
    imp, m = rmi_importance(C, beta=1.0)
    raw = [0.9 + 0.2, 0.9 + 0.3, 0.2 + 0.3]
    assert m == pytest.approx([r / sum(raw) for r in raw])
    assert imp == pytest.approx([math.exp(-v) for v in m])
    # the least redundant layer (2) is the most important
    assert max(range(3), key=lambda i: imp[i]) == 2


def test_gram_collector_inputs_and_outputs():
    x = [torch.randn(2, 3, 4), torch.randn(2, 3, 4)]
    y = [torch.randn(2, 3, 4), torch.randn(2, 3, 4)]
    col_o, col_i = GramCollector("outputs"), GramCollector("inputs")
    col_o(0, None, BlockInputs(x, {}), y)
    col_i(0, None, BlockInputs(x, {}), y)
    assert torch.allclose(col_o.grams[0], gram(torch.cat(y)))
    assert torch.allclose(col_i.grams[0], gram(torch.cat(x)))
    with pytest.raises(ConfigError):
        GramCollector("middle")


# -- the LP ----------------------------------------------------------------------------------------
def _brute_force_lp(imp, s, d, w):
    """LP optimum over the vertices: all but one variable at a bound."""
    L = len(imp)
    lo, hi = max(0.0, s - d), min(1.0, s + d)
    W = sum(w)
    best = math.inf
    for free in range(L):
        for bits in itertools.product((lo, hi), repeat=L - 1):
            x = list(bits[:free]) + [0.0] + list(bits[free:])
            x[free] = (s * W - sum(a * b for a, b in zip(x, w))) / w[free]
            if lo - 1e-12 <= x[free] <= hi + 1e-12:
                best = min(best, sum(a * b for a, b in zip(imp, x)))
    return best


@pytest.mark.parametrize("s_t", [0.0, 0.2, 0.488, 0.55, 0.7, 0.75, 0.9, 0.99])
def test_lp_mean_exact_bounds_and_optimal(s_t):
    g = torch.Generator().manual_seed(int(s_t * 1000))
    for weights in (None, [1.0, 2.0, 1.0, 3.0, 1.0, 1.5]):
        imp = torch.rand(6, generator=g).tolist()
        d = delta_for(s_t)
        x = lp_allocate(imp, s_t, d, weights)
        w = weights or [1.0] * 6
        mean = sum(a * b for a, b in zip(x, w)) / sum(w)
        assert abs(mean - s_t) < 1e-12
        assert all(max(0.0, s_t - d) - 1e-12 <= v <= s_t + d + 1e-12 and 0 <= v < 1 for v in x)
        obj = sum(a * b for a, b in zip(imp, x))
        assert obj <= _brute_force_lp(imp, s_t, d, w) + 1e-12
    # bang-bang: at most one layer strictly inside the box
    x = lp_allocate([0.5, 0.1, 0.9, 0.3], 0.6, 0.02)
    assert sum(1 for v in x if 0.58 + 1e-12 < v < 0.62 - 1e-12) <= 1
    assert x[2] == pytest.approx(0.58) and x[1] == pytest.approx(0.62)  # most important -> least sparse


def test_delta_defined_everywhere_and_matches_table():
    assert delta_for(0.3) == 0.01 and delta_for(0.5) == 0.01
    assert delta_for(0.55) == pytest.approx(0.02) and delta_for(0.6) == pytest.approx(0.02)
    assert delta_for(0.7) == pytest.approx(0.03) and delta_for(0.75) == pytest.approx(0.04)
    for k in range(1000):
        s = k / 1000
        d = delta_for(s)
        assert 0 <= d and s - d >= 0 and s + d < 1
    with pytest.raises(ConfigError):
        delta_for(1.0)


# -- ranks -----------------------------------------------------------------------------------------
def test_rank_allocation_exact_total_and_bounds():
    g = torch.Generator().manual_seed(1)
    for L in (1, 2, 7, 30):
        for total in (L, 3 * L + 1, 8 * L, 16 * L):
            err = (torch.rand(L, generator=g) ** 3).tolist()
            r = allocate_ranks(err, total, 1, 16)
            assert sum(r) == total and all(1 <= v <= 16 for v in r)
            # monotone in the error (ties aside)
            for i in range(L):
                for j in range(L):
                    if err[i] > err[j] * 1.5:
                        assert r[i] >= r[j]
    assert allocate_ranks([1.0, 100.0], 20, 1, 16) == [4, 16]
    assert allocate_ranks([0.0, 0.0, 0.0], 7) in ([3, 2, 2], [2, 3, 2], [2, 2, 3])
    with pytest.raises(ConfigError, match="smaller than"):
        allocate_ranks([1.0] * 5, 4)
    with pytest.raises(ConfigError):
        allocate_ranks([1.0] * 2, 40, 1, 16)
    # the code's per-round mean ranks 6..10 for T=5, r=8
    assert [round_rank_budget(8, t, 5, 1) for t in range(1, 6)] == [6, 7, 8, 9, 10]


# -- schedule --------------------------------------------------------------------------------------
def test_cubic_schedule():
    S = 0.7
    sched = sparsity_schedule(S, 5)
    assert sched == pytest.approx([S * f for f in (0.488, 0.784, 0.936, 0.992, 1.0)])
    assert sched[-1] == S and all(a < b for a, b in zip(sched, sched[1:]))
    assert cubic_sparsity(S, 1, 1) == pytest.approx(S)
    assert sparsity_schedule(0.5, 3, "flat") == [0.5, 0.5, 0.5]
    with pytest.raises(ConfigError):
        sparsity_schedule(0.5, 0)


# -- the adapter -----------------------------------------------------------------------------------
def _pruned_tiny(seed=0, sparsity=0.5):
    from sparse_runtime.prune import PruneConfig, prune_model

    lm = sr.load_model("tiny-llama")
    torch.manual_seed(seed)
    ids = torch.randint(0, 256, (4, 32))
    prune_model(lm.model, lm.tokenizer, PruneConfig(method="wanda", sparsity=sparsity), calib_ids=ids)
    return lm


def _attach(lm, **opts):
    from sparse_runtime.adapters import FINETUNE_METHODS, attach_adapters

    spec = FINETUNE_METHODS.get("losa")
    return attach_adapters(lm.model, spec, spec.make_config(**opts), lm.family)


def test_masked_lora_merge_exact_sparsity_and_logits():
    from sparse_runtime.merge import merge_adapters

    lm = _pruned_tiny()
    masks = {n: (lin.weight != 0).clone() for n, lin in lm.family.iter_linears(lm.model)}
    ads = _attach(lm, rank=4, alpha=8.0, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    for ad in ads.values():
        ad.set_rank(int(torch.randint(1, 7, (1,), generator=g)))
        ad.lora_B.data.normal_(0, 0.05, generator=g)
    ids = torch.randint(0, 256, (2, 24), generator=g)
    lm.model.eval()
    with torch.no_grad():
        before = lm.model(ids).logits
    merge_adapters(lm.model, lm.family, reprune="mask")
    with torch.no_grad():
        after = lm.model(ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    for n, lin in lm.family.iter_linears(lm.model):
        assert type(lin) is torch.nn.Linear and torch.equal(lin.weight != 0, masks[n])


def test_rank_increase_keeps_output_and_shrink_truncates_by_svd():
    lm = _pruned_tiny()
    ads = _attach(lm, rank=4, dropout=0.0)
    ad = next(iter(ads.values()))
    ad.lora_B.data.normal_(0, 0.1)
    x = torch.randn(3, ad.in_features)
    y0 = ad(x)
    scale0 = ad.scale
    ad.set_rank(9)
    assert ad.rank == 9 and ad.scale == scale0
    assert torch.allclose(ad(x), y0, atol=1e-6)
    # the old subspace is kept verbatim
    d = ad.delta_weight(masked=False)
    # shrink back: the update had rank 4, so rank 4 keeps it exactly (SVD truncation)
    ad.set_rank(4)
    assert torch.allclose(ad.delta_weight(masked=False), d, atol=1e-5)
    assert torch.allclose(ad(x), y0, atol=1e-5)
    # truncation is the best rank-k approximation (Eckart-Young)
    B, A = torch.randn(12, 5), torch.randn(5, 10)
    A2, B2 = truncate_svd(B, A, 2)
    S = torch.linalg.svdvals(B @ A)
    assert (B2 @ A2 - B @ A).norm() == pytest.approx(float(S[2:].norm()), rel=1e-4)


# -- the round loop --------------------------------------------------------------------------------
def _cfg(**kw):
    base = dict(sparsity=0.6, rounds=3, steps=3, train_batch_size=2, seq_len=32, nsamples=4, seqlen=32, rank=4,
                r_max=8, data="c4", protocol="test", dropout=0.0)
    base.update(kw)
    return LoSAConfig(**base)


def _check_rounds(res, cfg):
    sched = sparsity_schedule(cfg.sparsity, cfg.rounds, cfg.resolved_schedule())
    for r, s_t in zip(res.rounds, sched):
        assert r.target == pytest.approx(s_t, abs=0)
        assert abs(sum(r.block_rates) / len(r.block_rates) - s_t) < 1e-12  # equal-size blocks
        for rate, meas in zip(r.block_rates, r.block_measured):
            assert rate - 1 / 64 - 1e-9 <= meas <= rate + 1e-9  # per-row flooring of 64 inputs (at most)
        assert sum(r.ranks) == r.rank_budget


def test_rounds_from_dense_exact_per_round(data_dir):
    lm = sr.load_model("tiny-llama")
    cfg = _cfg()
    res = run_losa_model(lm, cfg, data_dir=data_dir)
    _check_rounds(res, cfg)
    assert [sum(r.ranks) for r in res.rounds] == [6, 8, 10]
    assert [r.steps for r in res.rounds] == [1, 1, 1]
    # final model: plain linears; every layer exactly at its allocated rate (Wanda: floor(in*x) zeros per row)
    last = res.rounds[-1]
    rate = dict(zip(res.blocks, last.block_rates))
    for name, lin in lm.family.iter_linears(lm.model):
        assert type(lin) is torch.nn.Linear
        bi = int(name.split(".")[2])
        per_row = (lin.weight == 0).sum(1)
        assert torch.all(per_row == math.floor(lin.in_features * rate[bi]))
    assert res.sparsity_measured == pytest.approx(last.measured_mean)


def test_rate_drop_between_rounds_keeps_effective_weights_exact(data_dir):
    """At 70 % with T = 5 the RMI allocation lowers some layer's rate between rounds: weights pruned
    earlier are kept again (holding ``tiny``), and ``(tiny - d) + d`` would round to an exact zero.
    The unmerge must keep every kept effective weight nonzero (a regression: it raised
    LoSAVerificationError in round 5), and must subtract the delta of the adapter's NEW rank."""
    lm = sr.load_model("tiny-llama")
    cfg = LoSAConfig(protocol="test", steps=3, train_batch_size=2, seq_len=32, rank=8, sparsity=0.7)
    res = run_losa_model(lm, cfg, data_dir=data_dir)
    assert len(res.rounds) == 5
    assert res.sparsity_measured == pytest.approx(res.rounds[-1].measured_mean)


def test_keep_effective_nonzero_moves_one_ulp():
    from sparse_runtime.losa.rounds import _keep_effective_nonzero_

    d = torch.tensor([3.8833e-04, -8.2291e-05, 0.5, 0.0])
    w = torch.tensor([0.0, 0.0, 0.25, torch.finfo(torch.float32).tiny])
    w[:2] = torch.finfo(torch.float32).tiny - d[:2]  # rounds to -d: the effective weight would vanish
    keep = torch.tensor([True, True, True, True])
    assert int(((w + d) == 0).sum()) == 2
    assert _keep_effective_nonzero_(w, d, keep) == 2
    assert torch.all((w + d) != 0)
    assert w[2] == 0.25  # untouched where the effective weight was already nonzero


def test_rounds_atp_sparsegpt_and_owl_dsnot(data_dir):
    for kw in (dict(allocation="atp", prune_method="sparsegpt", rounds=2, steps=2, rmi_features="inputs"),
               dict(allocation="owl", refine="dsnot", rounds=2, steps=0, owl_lambda=0.05)):
        lm = sr.load_model("tiny-llama")
        cfg = _cfg(**kw)
        res = run_losa_model(lm, cfg, data_dir=data_dir)
        for r in res.rounds:
            assert abs(sum(r.block_rates) / 2 - r.target) < 1e-12
            for rate, meas in zip(r.block_rates, r.block_measured):
                assert abs(meas - rate) <= 1 / 64 + 1e-9


def test_run_losa_checkpoint_manifest_and_from_pruned(tmp_path, data_dir):
    out = tmp_path / "losa"
    cfg = _cfg(rounds=2, steps=2)
    res = run_losa("tiny-llama", out, cfg, data_dir=data_dir)
    lm = sr.load_model(str(out))  # verifies the manifest against the weights
    step = lm.manifest.history[-1]
    assert step["stage"] == "losa" and len(step["rounds"]) == 2
    assert step["rounds"][0]["ranks"] == res.rounds[0].ranks
    assert (out / "losa_allocation.png").is_file() and (out / "losa_report.json").is_file()
    # from a pruned checkpoint: flat schedule at the target
    with pytest.raises(ConfigError, match="already"):
        run_losa_model(sr.load_model(str(out)), _cfg(rounds=1, steps=0), data_dir=data_dir)
    cfg2 = _cfg(rounds=2, steps=0, from_pruned=True)
    res2 = run_losa_model(sr.load_model(str(out)), cfg2, data_dir=data_dir)
    assert [r.target for r in res2.rounds] == [0.6, 0.6]


@pytest.mark.parametrize("kw, match", [
    (dict(rounds=0), "at least one round"),
    (dict(sparsity=1.0), "outside"),
    (dict(sparsity=-0.1), "outside"),
    (dict(rank=1, rounds=5), "smaller than the number of layers"),
    (dict(structure="2:4"), "N:M"),
    (dict(structure="2:4", mixed_nm=True), "not implemented"),
    (dict(allocation="magic"), "allocation"),
])
def test_bad_input_fails_before_any_work(tmp_path, kw, match, monkeypatch):
    import sparse_runtime.models as models

    def boom(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("loaded the model before validating")

    monkeypatch.setattr(models, "load_model", boom)
    with pytest.raises(ConfigError, match=match):
        run_losa("tiny-llama", tmp_path / "x", _cfg(**kw))
    assert not (tmp_path / "x").exists()


def test_rank_budget_smaller_than_layers_with_model(data_dir):
    lm = sr.load_model("tiny-llama")
    with pytest.raises(ConfigError, match="smaller than"):
        run_losa_model(lm, _cfg(rank=1, rounds=3, rank_schedule="rising"), data_dir=data_dir)
    # nothing was changed
    assert all(int((lin.weight == 0).sum()) == 0 for _, lin in lm.family.iter_linears(lm.model))


def test_cli_finetune_method_losa(tmp_path, data_dir):
    from sparse_runtime.cli import main

    out = tmp_path / "cli"
    rc = main(["finetune", "tiny-llama", "--method", "losa", "--sparsity", "0.5", "--rounds", "2", "--steps", "2",
               "--batch-size", "2", "--seq-len", "32", "--data", "c4", "--protocol", "test", "--rank", "4",
               "--data-dir", str(data_dir), "--out", str(out)])
    assert rc == 0 and (out / "sparsity_manifest.json").is_file()
    assert main(["finetune", "tiny-llama", "--method", "losa", "--sparsity", "1.5", "--out", str(tmp_path / "y")]) == 2


def test_adapters_name_losa_without_importing_it():
    """`losa` is listed by the adapters' registry and loaded on first lookup; importing the adapters
    never imports the LoSA package (no import climbing back up)."""
    import subprocess
    import sys

    code = ("import sys, sparse_runtime.adapters as a; assert 'losa' in a.FINETUNE_METHODS.names(); "
            "assert 'sparse_runtime.losa' not in sys.modules; assert a.FINETUNE_METHODS.get('losa').name == 'losa'; "
            "assert 'sparse_runtime.losa.adapter' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
