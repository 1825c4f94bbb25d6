"""One-shot pruning: exact counts and patterns, SparseGPT's math, the refiner hook, early errors."""
from __future__ import annotations

import math

import pytest
import torch

import sparse_runtime as sr
from sparse_runtime.calibration import InputStatistics, LayerTask
from sparse_runtime.errors import ConfigError, SparseRuntimeError
from sparse_runtime.prune import PruneConfig, prune_checkpoint, prune_model
from sparse_runtime.pruning import PRUNERS, magnitude_mask, sparsegpt_prune, wanda_mask
from sparse_runtime.sparsity import NMPattern, nm_compliant


def _model(family="llama", seed=0):
    m = sr.tiny_model(family, seed)
    return m, sr.models.ByteTokenizer()


def _linears(model):
    return dict(sr.family_of(model).iter_linears(model))


# -- plain-tensor references ---------------------------------------------------------------------
@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_wanda_exact_per_row_and_matches_reference(s):
    g = torch.Generator().manual_seed(0)
    W, norm = torch.randn(24, 40, generator=g), torch.rand(40, generator=g) + 0.1
    keep = wanda_mask(W, norm, s)
    k = int(40 * s)
    assert ((~keep).sum(1) == k).all()
    score = W.abs() * norm
    for r in range(24):  # reference: the k smallest scores of each row are pruned
        assert set(torch.argsort(score[r])[:k].tolist()) == set((~keep[r]).nonzero().flatten().tolist())


@pytest.mark.parametrize("s", [0.25, 0.5, 0.9])
def test_magnitude_exact_per_matrix_and_per_row_option(s):
    W = torch.randn(20, 36, generator=torch.Generator().manual_seed(1))
    keep = magnitude_mask(W, s)
    assert int((~keep).sum()) == int(W.numel() * s)
    thr = W.abs().flatten().sort()[0][int(W.numel() * s) - 1]
    assert (W.abs()[~keep] <= thr).all() and (W.abs()[keep] >= thr).all()
    assert (~keep).sum(1).unique().numel() > 1  # per matrix: rows differ
    keep_r = magnitude_mask(W, s, per_row=True)
    assert ((~keep_r).sum(1) == int(36 * s)).all()


def _sparsegpt_reference(W, H, s, pattern=None, percdamp=0.01, blocksize=128):
    """Row-major transcription of docs/methods.md#sparsegpt / the official fasterprune (exact-k mask)."""
    W = W.clone().double()
    H = H.clone().double()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        m1 = torch.zeros_like(W1, dtype=torch.bool)
        if pattern is None:
            tmp = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            m1.view(-1)[torch.sort(tmp.flatten(), stable=True)[1][:int(tmp.numel() * s)]] = True
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if pattern is not None and i % pattern.m == 0:
                tmp = W1[:, i:i + pattern.m] ** 2 / torch.diag(Hinv1)[i:i + pattern.m].reshape(1, -1) ** 2
                m1.scatter_(1, i + torch.topk(tmp, pattern.n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[m1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = m1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.float(), ~mask


def _correlated_inputs(n_tok, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g) / d ** 0.5
    scale = torch.exp(torch.randn(d, generator=g))  # some channels much larger (outliers)
    return (torch.randn(n_tok, d, generator=g) @ A + 0.3 * torch.randn(n_tok, d, generator=g)) * scale


def _kernels_built() -> bool:
    from sparse_runtime.kernels import available

    return available()


@pytest.mark.parametrize("impl", ["python", pytest.param("native", marks=pytest.mark.skipif(
    not _kernels_built(), reason="compiled kernels not built"))])
@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4), NMPattern(4, 8)])
def test_sparsegpt_matches_reference(pattern, impl):
    """Both OBS loops (PyTorch, compiled) against the plain reference; 200 columns with blocksize 16
    also cover a short last block."""
    X = _correlated_inputs(512, 200)
    W = torch.randn(24, 200, generator=torch.Generator().manual_seed(3))
    H = 2 * X.t() @ X / X.shape[0]
    out = sparsegpt_prune(W, H, 0.5, pattern, blocksize=16, impl=impl)
    ref_w, ref_keep = _sparsegpt_reference(W, H, 0.5, pattern, blocksize=16)
    assert torch.equal(out.keep, ref_keep)
    torch.testing.assert_close(out.weight, ref_w, rtol=1e-3, atol=1e-4)
    if pattern is None:
        assert int((out.weight == 0).sum()) == W.numel() // 2
    else:
        assert nm_compliant(out.weight, pattern)


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
def test_sparsegpt_lowers_reconstruction_error_below_magnitude_and_wanda(pattern):
    d, rows = 64, 32
    X = _correlated_inputs(2048, d, seed=5)
    W = torch.randn(rows, d, generator=torch.Generator().manual_seed(6))
    H = 2 * X.t() @ X / X.shape[0]
    norm = (X ** 2).sum(0).sqrt()
    err = lambda W2: float(torch.linalg.norm(X @ W.t() - X @ W2.t()))  # noqa: E731
    sg = sparsegpt_prune(W, H, 0.5, pattern).weight
    wa = W * wanda_mask(W, norm, 0.5, pattern)
    mg = W * magnitude_mask(W, 0.5, pattern)
    budget = int((sg == 0).sum())
    assert budget == int((wa == 0).sum()) == int((mg == 0).sum())  # same mask budget
    assert err(sg) < err(wa) and err(sg) < err(mg)
    assert err(wa) < err(mg)  # activation-aware beats magnitude on outlier channels


# -- through the sequential driver --------------------------------------------------------------
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("structure", ["2:4", "4:8"])
def test_nm_exact_for_every_method(method, structure):
    model, tok = _model()
    r = prune_model(model, tok, PruneConfig(method=method, structure=structure, protocol="test"))
    p = NMPattern.parse(structure)
    for name, lin in _linears(model).items():
        w = lin.weight.data
        zeros = (w.reshape(w.shape[0], -1, p.m) == 0).sum(-1)
        assert (zeros == p.n).all(), name  # exactly N zeros of every M
        assert r.structures[name] == structure
    assert r.sparsity_measured == pytest.approx(p.sparsity)


def test_prune_model_exact_counts_on_every_family(family_name):
    model, tok = _model(family_name)
    r = prune_model(model, tok, PruneConfig(method="wanda", sparsity=0.6, protocol="test"))
    for name, lin in _linears(model).items():
        zeros = (lin.weight.data == 0).sum(1)
        assert (zeros == int(lin.in_features * 0.6)).all(), name
    assert set(r.targets) == set(_linears(model))
    assert r.timing["calibration_forward_s"] > 0 and r.peak_rss_mb
    m2, _ = _model(family_name)
    prune_model(m2, tok, PruneConfig(method="magnitude", sparsity=0.6))
    for name, lin in _linears(m2).items():
        assert int((lin.weight.data == 0).sum()) == int(lin.weight.numel() * 0.6), name


def test_wanda_in_driver_uses_dense_block_inputs():
    """Wanda's mask for layer 0 equals the mask from norms recomputed on the model's own inputs."""
    model, tok = _model()
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    q = model.model.layers[0].self_attn.q_proj
    seen = []
    h = q.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    h.remove()
    X = torch.cat(seen)
    expected = wanda_mask(q.weight.data.clone(), (X ** 2).sum(0).div(4).sqrt(), 0.5)
    prune_model(model, tok, PruneConfig(method="wanda", sparsity=0.5, protocol="test"), calib_ids=ids)
    assert torch.equal(q.weight.data != 0, expected)


def test_include_exclude_and_true_sequential():
    model, tok = _model()
    cfg = PruneConfig(method="sparsegpt", sparsity=0.5, protocol="test", include=["*.mlp.*"],
                      exclude=["*.down_proj"], true_sequential=True)
    r = prune_model(model, tok, cfg)
    assert set(r.targets) == {f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_proj", "up_proj")}
    for name, lin in _linears(model).items():
        assert (sr.sparsity_of(lin.weight) > 0.4) == (name in r.targets)


# -- the refiner hook ---------------------------------------------------------------------------
class _SwapRefiner:
    """Per row, regrow the largest pruned dense weight and prune the smallest kept one."""

    needs = frozenset({"var", "mean"})

    def __init__(self):
        self.calls = []

    def refine(self, task, dense_weight, pruned_weight, keep, pattern, sparsity):
        assert task.stats.var is not None and task.stats.token_sum is not None and task.stats.sq_sum is not None
        assert torch.count_nonzero(dense_weight) == dense_weight.numel()  # it is the dense weight
        self.calls.append((task.name, sparsity))
        new_keep = keep.clone()
        big = torch.where(keep, -math.inf, dense_weight.abs()).argmax(1)
        small = torch.where(keep, dense_weight.abs(), math.inf).argmin(1)
        rows = torch.arange(keep.shape[0])
        new_keep[rows, big] = True
        new_keep[rows, small] = False
        return dense_weight * new_keep


def test_refiner_hook_runs_inside_the_pass_and_keeps_counts():
    model, tok = _model()
    ref = _SwapRefiner()
    r = prune_model(model, tok, PruneConfig(method="wanda", sparsity=0.5, protocol="test"), refiner=ref)
    assert [c[0] for c in ref.calls] == list(_linears(model))
    for name, lin in _linears(model).items():
        assert ((lin.weight.data == 0).sum(1) == lin.in_features // 2).all()
    assert r.refiner == "_SwapRefiner"


def test_refiner_that_breaks_counts_is_an_error():
    class Densify:
        needs = frozenset()

        def refine(self, task, dense_weight, pruned_weight, keep, pattern, sparsity):
            return dense_weight

    model, tok = _model()
    with pytest.raises(SparseRuntimeError, match="denser"):
        prune_model(model, tok, PruneConfig(method="wanda", sparsity=0.5, protocol="test"), refiner=Densify())


def test_refiner_names_come_from_a_fixed_table():
    model, tok = _model()
    with pytest.raises(ConfigError, match="unknown refiner"):
        prune_model(model, tok, PruneConfig(method="wanda", sparsity=0.5, refine="os.system"))


# -- bad input fails before any work --------------------------------------------------------------
@pytest.mark.parametrize("kw, msg", [
    (dict(sparsity=1.0), r"\[0, 1\)"),
    (dict(sparsity=-0.1), r"\[0, 1\)"),
    (dict(sparsity=None), "give a sparsity"),
    (dict(method="obs"), "unknown pruning method"),
    (dict(allocation="alpha"), "unknown allocation"),
    (dict(structure="3:5", sparsity=None), "multiple of M=5"),
    (dict(structure="2:4", sparsity=0.7), "exactly 0.5"),
    (dict(structure="2:4", sparsity=None, allocation="owl"), "cannot be combined with N:M"),
    (dict(allocation="atp", atp_beta=1.5), "out of range"),
    (dict(allocation="atp", atp_beta=-0.01), "out of range"),
    (dict(include=["lm_head"]), "select no layer"),
    (dict(allocation="owl", owl_lambda=0.6), "owl_lambda"),
])
def test_bad_input_errors_before_any_work(monkeypatch, kw, msg):
    import sparse_runtime.calibration as cal
    import sparse_runtime.data.text as text
    import sparse_runtime.prune as pr

    def boom(*a, **k):
        raise AssertionError("work started before validation")

    monkeypatch.setattr(text, "c4_windows", boom)
    monkeypatch.setattr(pr, "sequential_pass", boom)
    monkeypatch.setattr(cal, "sequential_pass", boom)
    model, tok = _model()
    before = {n: l.weight.data.clone() for n, l in _linears(model).items()}
    cfg = PruneConfig(**({"method": "wanda", "sparsity": 0.5} | kw))
    with pytest.raises(ConfigError, match=msg):
        prune_model(model, tok, cfg)
    assert all(torch.equal(before[n], l.weight.data) for n, l in _linears(model).items())


def test_prune_checkpoint_manifest_verifies_after_save_and_load(tmp_path):
    out = tmp_path / "ckpt"
    r = prune_checkpoint("tiny-qwen2", PruneConfig(method="sparsegpt", structure="2:4", protocol="test"), out)
    lm = sr.load_model(out)  # verifies the manifest against the weights
    m = lm.manifest
    assert m.dense_source == "tiny-qwen2" and m.history[-1]["method"] == "sparsegpt"
    assert all(rec.structure == "2:4" and rec.target == 0.5 for rec in m.layers.values())
    assert m.total_measured == pytest.approx(r.sparsity_measured)
    assert (out / "layer_sparsity.png").stat().st_size > 1000 and (out / "prune_report.json").is_file()
    sr.verify_manifest(lm.model, m)
    with torch.no_grad():
        next(iter(_linears(lm.model).values())).weight.data[0, :4] = 1.0
    with pytest.raises(sr.ManifestError):
        sr.verify_manifest(lm.model, m)
    with pytest.raises(sr.CheckpointExistsError):
        prune_checkpoint("tiny-qwen2", PruneConfig(method="wanda", sparsity=0.5, protocol="test"), out)


def test_registry_lists_the_three_methods():
    assert PRUNERS.names() == ["magnitude", "sparsegpt", "wanda"]
    task = LayerTask(0, "x", "x", torch.nn.Linear(8, 4, bias=False), InputStatistics(8, frozenset()))
    out = PRUNERS.get("magnitude").from_config(PruneConfig(sparsity=0.5)).prune(task, 0.5, None)
    assert int((out.weight == 0).sum()) == 16 and torch.equal(out.keep, out.weight != 0)


def test_offload_gives_the_same_result():
    """With offload the driver moves one block at a time; the pruned weights must not change."""
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    outs = []
    for offload in (False, True):
        model, tok = _model()
        prune_model(model, tok, PruneConfig(method="sparsegpt", sparsity=0.5, offload=offload, device="cpu"),
                    calib_ids=ids)
        outs.append({n: l.weight.data.clone() for n, l in _linears(model).items()})
    assert all(torch.equal(outs[0][n], outs[1][n]) for n in outs[0])


def test_topk_mask_selection_equals_the_stable_sort():
    """The selection-based mask (kthvalue, ties by position) is exactly the stable sort's."""
    from sparse_runtime.sparsity import topk_prune_mask

    def ref(score, sparsity, per_row):
        keep = torch.ones_like(score, dtype=torch.bool)
        k = int((score.shape[1] if per_row else score.numel()) * sparsity)
        if k and per_row:
            keep.scatter_(1, torch.sort(score, dim=1, stable=True)[1][:, :k], False)
        elif k:
            keep.view(-1)[torch.sort(score.reshape(-1), stable=True)[1][:k]] = False
        return keep

    g = torch.Generator().manual_seed(0)
    for trial in range(80):
        r, c = torch.randint(1, 40, (2,), generator=g).tolist()
        x = [torch.randn(r, c, generator=g), torch.randint(0, 3, (r, c), generator=g).float(),
             torch.randint(-2, 2, (r, c), generator=g).float() * 0.0,
             torch.randn(r, c, generator=g).abs() * torch.randint(0, 2, (r, c), generator=g)][trial % 4]
        for s in (0.0, 0.1, 0.5, 0.7, 0.99):
            for per_row in (True, False):
                assert torch.equal(topk_prune_mask(x, s, per_row), ref(x, s, per_row)), (trial, s, per_row)
    x = torch.randn(50, 64)
    x[3, 5] = float("nan")
    assert torch.equal(topk_prune_mask(x, 0.5, True), ref(x, 0.5, True))
