"""DSnoT invariants: exact per-row counts and N:M, monotone expected error, no-op settings, agreement
with a plain per-row reference loop, fused == standalone, and the checkpoint/CLI/stage round trip."""
from __future__ import annotations

import json
import math

import pytest
import torch

import sparse_runtime as sr
from sparse_runtime.errors import ConfigError, ManifestError
from sparse_runtime.repair.dsnot import (DSnoTConfig, DSnoTRefiner, InputMoments, dsnot_refine_mask, make_config,
                                         refine_linear, repair_dsnot_checkpoint, row_thresholds)
from sparse_runtime.sparsity import NMPattern, nm_compliant, nm_prune_mask, topk_prune_mask


def _layer(rows=24, cols=64, seed=0, sparsity=0.6, pattern=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(512, cols, generator=g) * torch.rand(cols, generator=g) + torch.randn(cols, generator=g) * 0.5
    mean, var, norm = x.mean(0), x.var(0, unbiased=False), x.pow(2).sum(0).sqrt()
    score = w.abs() * norm
    keep = nm_prune_mask(score, pattern) if pattern else topk_prune_mask(score, sparsity, per_row=True)
    return w, keep, mean, var, norm


def _reference(w, keep, mean, var, norm, cfg, thr, pattern=None):
    """A plain per-row loop of the same algorithm (Eqs. 1-3), written for clarity, not speed."""
    keep = keep.clone()
    floor = cfg.var_floor * float(var.mean()) + 1e-20 if cfg.var_floor > 0 else 0.0
    same_sign = cfg.same_sign if cfg.same_sign is not None else pattern is not None
    for r in range(w.shape[0]):
        c = (w[r] * mean).tolist()
        g = (w[r] * mean / var.clamp_min(floor) ** cfg.var_power).tolist()
        wanda = (w[r].abs() * norm).tolist()
        spread = (w[r] * w[r] * var).tolist()
        P = [j for j in range(w.shape[1]) if not keep[r, j]]
        K = [j for j in range(w.shape[1]) if keep[r, j]]
        e = sum(c[j] for j in P)
        e0 = e
        grow_pos = sorted([j for j in P if c[j] > 0], key=lambda j: -g[j])
        grow_neg = sorted([j for j in P if c[j] < 0], key=lambda j: g[j])
        prune_neg = sorted([j for j in K if c[j] < 0], key=lambda j: wanda[j])
        prune_pos = sorted([j for j in K if c[j] > 0], key=lambda j: wanda[j])
        partner_ok = set(K)
        for _ in range(cfg.max_cycles):
            if not (abs(e) > float(thr[r]) and e != 0):
                break
            gl, pl = (grow_pos, prune_neg) if e > 0 else (grow_neg, prune_pos)
            if not gl:
                break
            i = gl[0]
            if pattern is not None:
                start = i - i % pattern.m
                cands = [k for k in range(start, start + pattern.m) if k in partner_ok]
                if not cands:
                    gl.pop(0)
                    continue
                k = min(cands, key=lambda k: wanda[k])
            else:
                if not pl:
                    break
                k = pl[0]
            after = e - c[i] + c[k]
            if same_sign and math.copysign(1, after) != math.copysign(1, e0) or (same_sign and after == 0):
                break
            if cfg.require_decrease and cfg.objective == "mean" and not abs(after) < abs(e):
                break
            if cfg.require_decrease and cfg.objective == "mse" and not after * after - e * e + spread[k] - spread[i] < 0:
                break
            keep[r, i], keep[r, k] = True, False
            e = after
            gl.pop(0)
            if pattern is None:
                pl.pop(0)
            else:
                partner_ok.discard(k)
    return keep


CONFIGS = [DSnoTConfig(threshold=0.01), DSnoTConfig(threshold=0.01, objective="mean"),
           DSnoTConfig(threshold=0.2, max_cycles=7, same_sign=False),
           DSnoTConfig(same_sign=False, require_decrease=False, threshold=0.0),
           DSnoTConfig(same_sign=False, threshold=0.05, var_power=0.5),
           DSnoTConfig.official(threshold=0.0)]


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4), NMPattern(4, 8)])
@pytest.mark.parametrize("ci", range(len(CONFIGS)))
def test_matches_plain_reference_and_keeps_counts(pattern, ci):
    cfg = CONFIGS[ci]
    w, keep, mean, var, norm = _layer(seed=ci, pattern=pattern)
    thr = row_thresholds(cfg, w, keep, mean, None, 512)
    res = dsnot_refine_mask(w, keep, mean, var, norm, cfg, pattern=pattern, threshold=thr)
    ref = _reference(w, keep, mean, var, norm, cfg, thr, pattern)
    assert torch.equal(res.keep, ref)
    assert torch.equal(res.keep.sum(1), keep.sum(1))  # exact per-row count
    assert int(res.swaps.sum()) > 0
    if pattern is not None:
        assert nm_compliant(res.keep.float(), pattern)
        g = res.keep.reshape(w.shape[0], -1, pattern.m).sum(-1)
        assert bool((g == pattern.kept).all())  # exactly M-N kept per group
    # the tracked error equals Eq. (1) recomputed on the final mask
    e = (w * mean * ~res.keep).sum(1)
    assert torch.allclose(res.error_after, e, atol=1e-4)


def _mse(w, keep, mean, var):
    """Eq. (4) per row: e_r^2 + sum_{j pruned} W_rj^2 Var(x_j)."""
    e = (w * mean * ~keep).sum(1)
    return e * e + (w * w * var * ~keep).sum(1)


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
def test_default_objective_never_increases(pattern):
    """The default objective (Eq. 4, expected squared error) is non-increasing across accepted swaps:
    running t cycles for t = 0..T gives a non-increasing sequence, per row."""
    w, keep, mean, var, norm = _layer(rows=48, cols=128, seed=5, pattern=pattern)
    seq = []
    for t in range(0, 16):
        res = dsnot_refine_mask(w, keep, mean, var, norm, DSnoTConfig(threshold=0.0, max_cycles=t), pattern=pattern)
        seq.append(_mse(w, res.keep, mean, var))
    seq = torch.stack(seq)
    assert bool((seq[1:] <= seq[:-1] + 1e-5).all())
    assert float(seq[-1].mean()) < float(seq[0].mean())


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
@pytest.mark.parametrize("cfg", [DSnoTConfig(threshold=0.0, objective="mean"),
                                 DSnoTConfig(threshold=0.0, require_decrease=False)])
def test_expected_error_never_increases(pattern, cfg):
    """|e_r| of Eq. (1) is non-increasing across accepted swaps, and strictly lower after each, with
    ``objective="mean"``; unstructured, ``same_sign`` alone guarantees it too (both moves push e_r
    towards zero and it may not cross)."""
    if pattern is not None and not cfg.require_decrease:
        pytest.skip("N:M partners may have either sign: only require_decrease guarantees monotonicity")
    for seed in range(3):
        w, keep, mean, var, norm = _layer(rows=64, cols=128, seed=seed, pattern=pattern)
        res = dsnot_refine_mask(w, keep, mean, var, norm, cfg, pattern=pattern, trace=True)
        errs = torch.stack(res.trace).abs()  # [cycles+1, rows]
        assert bool((errs[1:] <= errs[:-1]).all())
        changed = errs[1:] != errs[:-1]
        assert bool((errs[1:][changed] < errs[:-1][changed]).all())
        assert float(res.error_after.abs().mean()) < float(res.error_before.abs().mean())


def test_official_unstructured_default_may_overshoot():
    """Documented difference: the released code (no same-sign, no decrease rule) lets e_r cross zero."""
    w, keep, mean, var, norm = _layer(rows=64, cols=128, seed=1)
    res = dsnot_refine_mask(w, keep, mean, var, norm, DSnoTConfig.official(threshold=0.0), trace=True)
    signs = torch.sign(torch.stack(res.trace))
    assert bool((signs != signs[0]).any())


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
@pytest.mark.parametrize("cfg", [DSnoTConfig(threshold=math.inf), DSnoTConfig(max_cycles=0),
                                 DSnoTConfig(threshold=math.inf, threshold_unit="token_sum")])
def test_infinite_threshold_or_zero_cycles_leave_mask_unchanged(pattern, cfg):
    w, keep, mean, var, norm = _layer(pattern=pattern)
    moments = InputMoments(mean, var, var + mean ** 2, norm, 512.0)
    pruned = w * keep
    new, res = refine_linear(w, pruned, moments, cfg, pattern)
    assert torch.equal(res.keep, keep) and torch.equal(new, pruned) and int(res.swaps.sum()) == 0


def test_regrown_weights_take_dense_values_and_kept_ones_keep_theirs():
    """After SparseGPT the kept values were reconstructed: they stay; regrown ones are dense."""
    w, keep, mean, var, norm = _layer(seed=3)
    updated = (w + 0.1) * keep  # stand-in for SparseGPT's reconstructed kept weights
    new, res = refine_linear(w, updated, InputMoments(mean, var, var + mean ** 2, norm, 512.0),
                             DSnoTConfig(threshold=0.0), None, keep)
    grown = res.keep & ~keep
    stayed = res.keep & keep
    assert bool(grown.any())
    assert torch.equal(new[grown], w[grown]) and torch.equal(new[stayed], updated[stayed])
    assert bool((new[~res.keep] == 0).all())


def test_dead_and_constant_channels_are_safe():
    w, keep, mean, var, norm = _layer(seed=4)
    var = var.clone()
    mean = mean.clone()
    var[:5] = 0.0  # constant channels
    mean[5:8], var[5:8] = 0.0, 0.0  # dead channels
    res = dsnot_refine_mask(w, keep, mean, var, norm, DSnoTConfig(threshold=0.0))
    assert torch.isfinite(res.error_after).all() and torch.equal(res.keep.sum(1), keep.sum(1))
    assert not bool((res.keep & ~keep)[:, 5:8].any())  # zero contribution: never a growth candidate


def test_thresholds_units():
    w, keep, mean, var, norm = _layer()
    e0 = (w * mean * ~keep).sum(1).abs()
    assert torch.allclose(row_thresholds(DSnoTConfig(threshold=0.1), w, keep, mean, None, 512), 0.1 * e0)
    tok = row_thresholds(DSnoTConfig(threshold=0.1, threshold_unit="token_sum"), w, keep, mean, None, 2048)
    assert torch.allclose(tok, torch.full_like(tok, 0.1 / 2048))  # official: seqlen * E[x]
    sq = var + mean ** 2
    rms = row_thresholds(DSnoTConfig(threshold=1.0, threshold_unit="output_rms"), w, keep, mean, sq, 512)
    assert torch.allclose(rms, ((w ** 2) @ sq).sqrt())
    # scale-free: scaling activations by 10 scales e_r and the "initial" threshold alike
    a = dsnot_refine_mask(w, keep, mean, var, norm, DSnoTConfig(),
                          threshold=row_thresholds(DSnoTConfig(), w, keep, mean, None, 512))
    b = dsnot_refine_mask(w, keep, mean * 10, var * 100, norm * 10, DSnoTConfig(),
                          threshold=row_thresholds(DSnoTConfig(), w, keep, mean * 10, None, 512))
    assert torch.equal(a.keep, b.keep)


def test_config_validation_and_aliases():
    with pytest.raises(ConfigError, match="max_cycles"):
        DSnoTConfig(max_cycles=-1).validate()
    with pytest.raises(ConfigError, match="threshold"):
        DSnoTConfig(threshold=-0.1).validate()
    with pytest.raises(ConfigError, match="threshold_unit"):
        DSnoTConfig(threshold_unit="tokens").validate()
    with pytest.raises(ConfigError, match="layers"):
        DSnoTConfig(layers="mlp_only").validate()
    with pytest.raises(ConfigError, match="unknown dsnot option"):
        make_config({"cycles": 3})
    c = make_config({"max_cycle_time": 20, "update_threshold": 0.5, "pow_of_var_regrowing": 2, "without_same_sign": True})
    assert (c.max_cycles, c.threshold, c.var_power, c.same_sign) == (20, 0.5, 2, False)
    o = make_config({"preset": "official", "layers": "all"})
    assert o.threshold_unit == "token_sum" and o.layers == "all" and o.same_sign is None
    assert o.objective == "mean" and not o.require_decrease
    with pytest.raises(ConfigError, match="objective"):
        DSnoTConfig(objective="l2").validate()
    assert DSnoTConfig(layers="attention").applies_to("self_attn.q_proj")
    assert not DSnoTConfig(layers="attention").applies_to("mlp.down_proj")


# -- in the model --------------------------------------------------------------------------------
def _tiny(family="llama"):
    lm = sr.load_model(f"tiny-{family}")
    return lm


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_fused_with_prune_model_keeps_counts_and_changes_masks(structure):
    from sparse_runtime.prune import PruneConfig, prune_model

    kw = dict(sparsity=0.6) if structure == "unstructured" else dict(structure=structure)
    base = _tiny()
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    prune_model(base.model, base.tokenizer, PruneConfig(method="wanda", protocol="test", **kw), calib_ids=ids)
    lm = _tiny()
    ref = DSnoTRefiner(threshold=0.0)
    prune_model(lm.model, lm.tokenizer, PruneConfig(method="wanda", protocol="test", **kw), calib_ids=ids, refiner=ref)
    changed = 0
    for (n, a), (_, b) in zip(base.family.iter_linears(base.model), lm.family.iter_linears(lm.model)):
        assert torch.equal((a.weight != 0).sum(1), (b.weight != 0).sum(1)), n
        if structure != "unstructured":
            assert nm_compliant(b.weight, NMPattern.parse(structure))
        changed += int(((a.weight != 0) != (b.weight != 0)).any())
    assert changed > 0 and ref.summary()["swaps"] > 0
    assert ref.summary()["mean_abs_error_after"] < ref.summary()["mean_abs_error_before"]


def test_fused_by_name_with_official_options():
    from sparse_runtime.prune import PruneConfig, prune_model

    lm = _tiny("qwen2")
    r = prune_model(lm.model, lm.tokenizer, PruneConfig(method="wanda", sparsity=0.5, protocol="test", refine="dsnot",
                                                       refine_options={"max_cycle_time": 10, "preset": "official"}))
    assert r.refiner == "dsnot" and abs(r.sparsity_measured - 0.5) < 1e-9


@pytest.fixture(scope="module")
def pruned_ckpt(tmp_path_factory):
    from sparse_runtime.prune import PruneConfig, prune_checkpoint

    out = tmp_path_factory.mktemp("dsnot") / "wanda"
    prune_checkpoint("tiny-llama", PruneConfig(method="wanda", sparsity=0.6, protocol="test"), out, plot=False)
    return out


def test_standalone_repair_end_to_end_equals_fused(pruned_ckpt, tmp_path):
    from sparse_runtime.data.text import c4_windows
    from sparse_runtime.prune import PruneConfig, prune_model

    out = tmp_path / "repaired"
    rep = repair_dsnot_checkpoint(pruned_ckpt, out, DSnoTConfig(threshold=0.0), protocol="test")
    lm = sr.load_model(out)  # verifies the manifest against the weights
    src = sr.load_model(pruned_ckpt)
    assert lm.manifest.history[-1]["stage"] == "repair" and lm.manifest.history[-1]["method"] == "dsnot"
    assert [h["stage"] for h in lm.manifest.history] == ["prune", "repair"]
    assert lm.manifest.dense_source == "tiny-llama" and rep.summary["swaps"] > 0
    for (n, a), (_, b) in zip(src.family.iter_linears(src.model), lm.family.iter_linears(lm.model)):
        assert torch.equal((a.weight != 0).sum(1), (b.weight != 0).sum(1)), n
        assert lm.manifest.layers[n].target == src.manifest.layers[n].target
    # block 0 is exactly DSnoT fused into Wanda's pass on the same calibration windows (later blocks
    # differ by design: the checkpoint's masks there were made on inputs of the un-repaired block 0)
    fused = sr.load_model("tiny-llama")
    ids = c4_windows(fused.tokenizer, 4, 32, 0)
    prune_model(fused.model, fused.tokenizer, PruneConfig(method="wanda", sparsity=0.6, protocol="test"),
                calib_ids=ids, refiner=DSnoTRefiner(threshold=0.0))
    for (n, a), (_, b) in zip(fused.family.iter_linears(fused.model), lm.family.iter_linears(lm.model)):
        if ".layers.0." in n:
            assert torch.equal(a.weight, b.weight), n
        assert torch.equal((a.weight != 0).sum(1), (b.weight != 0).sum(1)), n


def test_standalone_repair_errors(pruned_ckpt, tmp_path):
    with pytest.raises(sr.CheckpointExistsError):
        repair_dsnot_checkpoint(pruned_ckpt, pruned_ckpt, protocol="test")
    other = tmp_path / "other"
    sr.tiny_model("llama", 0, intermediate_size=96).save_pretrained(other, safe_serialization=True)
    with pytest.raises(ManifestError, match="not the model"):
        repair_dsnot_checkpoint(pruned_ckpt, tmp_path / "x", dense=str(other), protocol="test")
    with pytest.raises(ManifestError, match="itself sparse"):
        repair_dsnot_checkpoint(pruned_ckpt, tmp_path / "y", dense=str(pruned_ckpt), protocol="test")


def test_cli_and_recipe_stage(pruned_ckpt, tmp_path):
    from sparse_runtime.cli import main
    from sparse_runtime.recipe import Recipe, run_recipe

    out = tmp_path / "cli"
    rc = main(["repair", str(pruned_ckpt), "--method", "dsnot", "--out", str(out), "--protocol", "test",
               "--max-cycles", "5", "--layers", "attention", "--json", str(tmp_path / "r.json")])
    assert rc == 0 and sr.load_model(out).manifest.history[-1]["config"]["max_cycles"] == 5
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["layers"] == 8  # 4 attention x 2 blocks
    assert main(["repair", str(pruned_ckpt), "--method", "nope", "--out", str(tmp_path / "n")]) == 2
    assert main(["repair", str(pruned_ckpt), "--out", str(tmp_path / "m"), "--threshold", "-1"]) == 2
    recipe = Recipe.from_dict({"model": str(pruned_ckpt), "protocol": "test",
                               "steps": [{"stage": "repair", "method": "dsnot", "threshold": 0.0}]})
    ctx = run_recipe(recipe, tmp_path / "run")
    assert ctx.results[-1]["metrics"]["summary"]["swaps"] > 0
    assert sr.load_model(ctx.model).manifest.history[-1]["stage"] == "repair"


def test_updated_kept_weights_error_is_that_of_the_actual_layer():
    """After SparseGPT (kept weights updated), e_r and Eq. (4) are those of the actual weights,
    D = W_dense - V: tracked e_r matches the final layer, and Eq. (4) never increases."""
    w, keep, mean, var, norm = _layer(rows=48, cols=128, seed=6)
    g = torch.Generator().manual_seed(7)
    v = (w + 0.3 * torch.randn(w.shape, generator=g)) * keep
    moments = InputMoments(mean, var, var + mean ** 2, norm, 512.0)

    def j(vv):
        d = w - vv
        return (d @ mean) ** 2 + (d * d * var).sum(1)

    prev = j(v)
    for t in (2, 5, 10, 20):
        new, res = refine_linear(w, v, moments, DSnoTConfig(threshold=0.0, max_cycles=t), None, keep)
        assert torch.allclose(res.error_after, (w - new) @ mean, atol=1e-4)
        cur = j(new)
        assert bool((cur <= prev + 1e-4).all())
        prev = cur
    assert int(res.swaps.sum()) > 0 and torch.equal((new != 0).sum(1), keep.sum(1))


# -- objective="gram": the exact calibration output error (Eq. 5) ------------------------------------
def _gram_layer(rows=32, cols=96, seed=8, pattern=None, correlated=True):
    """A layer whose inputs have correlated channels (where Eq. 4's independence assumption fails)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    base = torch.randn(1024, cols // 4, generator=g)
    x = torch.randn(1024, cols, generator=g) * 0.3 + torch.randn(cols, generator=g) * 0.4
    if correlated:
        x = x + base.repeat_interleave(4, dim=1)
    mean, var, norm = x.mean(0), x.var(0, unbiased=False), x.pow(2).sum(0).sqrt()
    keep = nm_prune_mask(w.abs() * norm, pattern) if pattern else topk_prune_mask(w.abs() * norm, 0.5, per_row=True)
    return w, keep, x, mean, var, norm


def _calib_error(w, weights, x):
    """Plain reference: mean over calibration tokens of the squared output error, per row."""
    return ((x @ (w - weights).t()) ** 2).mean(0)


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
@pytest.mark.parametrize("updated", [False, True])
def test_gram_objective_never_increases_the_calibration_error(pattern, updated):
    """With objective='gram' every accepted swap lowers the row's squared output error measured
    directly on the calibration tokens (the reference recomputes it from x), dense-valued or
    SparseGPT-updated kept weights alike; counts and N:M stay exact."""
    w, keep, x, mean, var, norm = _gram_layer(pattern=pattern)
    v = (w + 0.2 * torch.randn(w.shape, generator=torch.Generator().manual_seed(9))) * keep if updated else w * keep
    moments = InputMoments(mean, var, var + mean ** 2, norm, 1024.0, gram=x.t() @ x / x.shape[0])
    prev = _calib_error(w, v, x)
    start = prev.clone()
    for t in (1, 3, 8, 20, 50):
        new, res = refine_linear(w, v, moments, DSnoTConfig(threshold=0.0, max_cycles=t, objective="gram"), pattern,
                                 keep)
        cur = _calib_error(w, new, x)
        assert bool((cur <= prev * (1 + 1e-5) + 1e-5).all())
        prev = cur
        assert torch.equal((new != 0).sum(1), keep.sum(1))
        if pattern is not None:
            assert nm_compliant(new, pattern)
    assert int(res.swaps.sum()) > 0 and float(prev.sum()) < float(start.sum())


def test_gram_objective_needs_the_second_moment_and_is_gathered_when_fused():
    w, keep, x, mean, var, norm = _gram_layer(correlated=False)
    with pytest.raises(ConfigError, match="second-moment"):
        dsnot_refine_mask(w, keep, mean, var, norm, DSnoTConfig(objective="gram"))
    assert "hessian" in DSnoTRefiner(objective="gram").needs and "hessian" not in DSnoTRefiner().needs
    from sparse_runtime.prune import PruneConfig, prune_model

    lm = _tiny()
    ref = DSnoTRefiner(objective="gram", threshold=0.0)
    prune_model(lm.model, lm.tokenizer, PruneConfig(method="wanda", sparsity=0.5, protocol="test"), refiner=ref)
    assert ref.summary()["swaps"] > 0


# -- the block guard (docs/dsnot.md#the-block-guard) ---------------------------------------------
class _Block(torch.nn.Module):
    """A one-linear 'block' for the guard: its output is the linear's (no residual)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        self.lin.weight.data.copy_(w)

    def forward(self, x):
        return self.lin(x)


def _guarded_block(pattern, guard_on_stats_inputs: bool, **options):
    """DSnoT on a block whose statistics come from inputs with a large mean (what DSnoT optimises),
    then the guard on the stats' own inputs or on zero-mean inputs of the same spread. There the
    mean error DSnoT cancels is absent and only the variance its swaps add remains: DSnoT makes the
    block worse, as inputs unlike the statistics do inside a real block."""
    from sparse_runtime.calibration import BlockInputs, InputStatistics, LayerTask
    from sparse_runtime.pruning.wanda import wanda_mask

    g = torch.Generator().manual_seed(3)
    rows, cols = 16, 64
    w = torch.randn(rows, cols, generator=g)
    spread = torch.rand(cols, generator=g) + 0.2
    z = torch.randn(2, 64, cols, generator=g) * spread
    x_stats = z + 2.0 * torch.randn(cols, generator=g)
    stats = InputStatistics(cols, frozenset({"norm", "mean", "var", "hessian"}))
    stats.add_batch(x_stats)
    block = _Block(w)
    keep = wanda_mask(w, stats.norm, 0.5, pattern)
    pruned = w * keep
    ref = DSnoTRefiner(**{"threshold": 0.0, "guard": "block", **options})
    new = ref.refine(LayerTask(0, "b.0.lin", "lin", block.lin, stats), w.clone(), pruned.clone(), keep, pattern, 0.5)
    assert not torch.equal(new, pruned), "the construction needs DSnoT to change the mask"
    block.lin.weight.data.copy_(new)
    hidden = [x_stats if guard_on_stats_inputs else z]
    outs = [block(h) for h in hidden]
    ref.on_block_end(0, block, BlockInputs(hidden, {}), outs)
    return ref, block, keep, pruned, new, hidden, outs


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
def test_guard_keeps_the_pruner_mask_where_dsnot_worsens_the_block(pattern):
    ref, block, keep, pruned, new, hidden, outs = _guarded_block(pattern, guard_on_stats_inputs=False)
    log = ref.guard_log[0]
    assert not log["kept"] and log["error_dsnot"] > log["error_pruner"]
    assert torch.equal(block.lin.weight.data, pruned)  # the pruner's weights are back
    assert torch.equal((block.lin.weight != 0).sum(1), keep.sum(1))  # per-row sparsity exact
    if pattern is not None:
        assert nm_compliant(block.lin.weight.data, pattern)
    assert torch.allclose(outs[0], block(hidden[0]))  # the next block sees the kept block
    s = ref.summary()
    assert s["blocks_reverted"] == [0] and s["swaps"] == 0 and s["swaps_reverted"] > 0 and s["rows_changed"] == 0


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
def test_guard_keeps_dsnot_where_it_lowers_the_block_error(pattern):
    # objective=gram lowers the layer's exact error on the statistics' inputs, so on them it must stay
    ref, block, keep, pruned, new, hidden, outs = _guarded_block(pattern, guard_on_stats_inputs=True, objective="gram")
    assert ref.guard_log[0]["kept"] and ref.guard_log[0]["error_dsnot"] < ref.guard_log[0]["error_pruner"]
    assert torch.equal(block.lin.weight.data, new)
    assert torch.equal((block.lin.weight != 0).sum(1), keep.sum(1))
    assert ref.summary()["blocks_reverted"] == [] and ref.summary()["swaps"] > 0


def test_guard_off_is_the_unguarded_behaviour():
    ref, block, keep, pruned, new, hidden, outs = _guarded_block(None, guard_on_stats_inputs=False, guard="none")
    assert ref.guard_log == [] and torch.equal(block.lin.weight.data, new)


def test_guard_options_parse():
    assert DSnoTConfig().guard == "none" and DSnoTConfig().guard_samples == 8  # off: it did not help (docs)
    assert make_config({"guard": "block"}).guard == "block"
    assert make_config({"guard": "none"}).guard == "none"
    assert make_config({"guard": False}).guard == "none"  # YAML `guard: off`
    assert make_config({"guard_samples": 4.0}).guard_samples == 4
    assert make_config({"preset": "official"}).guard == "none"
    assert make_config({"preset": "official", "guard": "block"}).guard == "block"
    with pytest.raises(ConfigError, match="guard"):
        make_config({"guard": "layer"})
    with pytest.raises(ConfigError, match="guard_samples"):
        make_config({"guard_samples": 0})


def test_guard_runs_in_the_fused_pass_and_keeps_counts():
    from sparse_runtime.prune import PruneConfig, prune_model

    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    base = _tiny()
    prune_model(base.model, base.tokenizer, PruneConfig(method="wanda", sparsity=0.5, protocol="test"), calib_ids=ids)
    lm = _tiny()
    ref = DSnoTRefiner(threshold=0.0, guard="block", guard_samples=2)
    prune_model(lm.model, lm.tokenizer, PruneConfig(method="wanda", sparsity=0.5, protocol="test"), calib_ids=ids,
                refiner=ref)
    s = ref.summary()
    assert s["blocks_guarded"] == len(lm.family.blocks(lm.model)) and s["guard_seconds"] > 0
    for (n, a), (_, b) in zip(base.family.iter_linears(base.model), lm.family.iter_linears(lm.model)):
        assert torch.equal((a.weight != 0).sum(1), (b.weight != 0).sum(1)), n
        rec = ref.records[n]
        assert rec.reverted == (int(n.split(".")[2]) in s["blocks_reverted"] and rec.swaps_reverted > 0), n
        assert not rec.reverted or rec.swaps == 0


# -- held-out acceptance (accept="heldout", docs/dsnot.md#held-out-acceptance) ----------------------
def _forced_ppl(monkeypatch, dsnot_ppl: float, pruner_ppl: float):
    """Make the held-out check see the given perplexities (first call: DSnoT's weights, second: the pruner's)."""
    import sparse_runtime.eval.perplexity as perp

    calls = []

    def fake(model, ids, seqlen, max_windows=None, desc="", protocol="custom"):
        calls.append(desc)
        return perp.PerplexityResult(dsnot_ppl if len(calls) == 1 else pruner_ppl, seqlen, 1, seqlen, 0.0, protocol)

    monkeypatch.setattr(perp, "perplexity_from_ids", fake)
    return calls


@pytest.mark.parametrize("dsnot_wins", [False, True])
def test_heldout_acceptance_falls_back_to_exactly_the_pruner_model(monkeypatch, dsnot_wins):
    from sparse_runtime.prune import PruneConfig, prune_model

    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig(method="wanda", sparsity=0.5, protocol="test")
    base = _tiny()
    prune_model(base.model, base.tokenizer, cfg, calib_ids=ids)
    free = _tiny()  # DSnoT as the paper runs it: its outputs feed the next block
    prune_model(free.model, free.tokenizer, cfg, calib_ids=ids, refiner=DSnoTRefiner(threshold=0.0))
    calls = _forced_ppl(monkeypatch, 1.0 if dsnot_wins else 2.0, 1.5)
    lm = _tiny()
    ref = DSnoTRefiner(threshold=0.0, accept="heldout", heldout_windows=2)
    prune_model(lm.model, lm.tokenizer, cfg, calib_ids=ids, refiner=ref)
    s = ref.summary()
    assert len(calls) == 2 and s["heldout"]["kept"] == dsnot_wins and s["heldout"]["swaps"] > 0
    plain = dict(base.family.iter_linears(base.model))
    first_block_differs = False
    for n, b in lm.family.iter_linears(lm.model):
        a = plain[n].weight
        assert torch.equal((a != 0).sum(1), (b.weight != 0).sum(1)), n
        if not dsnot_wins:  # reverted: bit-for-bit the plain pruner's model, every block
            assert torch.equal(a, b.weight), n
            assert ref.records[n].reverted and ref.records[n].swaps == 0
        elif ".0." in n:  # block 0 sees the same inputs either way: DSnoT's masks as without the check
            assert torch.equal(b.weight, dict(free.family.iter_linears(free.model))[n].weight), n
            first_block_differs |= not torch.equal(a, b.weight)
    assert first_block_differs or not dsnot_wins
    assert s["swaps"] == (s["heldout"]["swaps"] if dsnot_wins else 0)


@pytest.mark.parametrize("dsnot_wins", [False, True])
def test_compare_keeps_the_papers_pass_or_exactly_the_pruners(monkeypatch, dsnot_wins):
    """accept=compare: the paper's fused pass unchanged when it wins on held-out windows; otherwise
    the pruner's own pass, bit for bit (every block, not only the first)."""
    from sparse_runtime.prune import PruneConfig, prune_model

    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig(method="wanda", sparsity=0.5, protocol="test")
    base = _tiny()
    prune_model(base.model, base.tokenizer, cfg, calib_ids=ids)
    free = _tiny()  # the paper's pass
    prune_model(free.model, free.tokenizer, cfg, calib_ids=ids, refiner=DSnoTRefiner(threshold=0.0))
    calls = _forced_ppl(monkeypatch, 1.0 if dsnot_wins else 2.0, 1.5)
    lm = _tiny()
    ref = DSnoTRefiner(threshold=0.0, accept="compare", heldout_windows=2)
    r = prune_model(lm.model, lm.tokenizer, cfg, calib_ids=ids, refiner=ref)
    s = ref.summary()
    assert len(calls) == 2 and s["heldout"]["kept"] == dsnot_wins and s["heldout"]["swaps"] > 0
    assert r.refiner_check == s["heldout"]  # the decision travels with the result (a recipe's report shows it)
    from sparse_runtime.stages.basic import _detail

    cell = _detail("prune", {"method": "wanda", "refiner_check": r.refiner_check})
    assert cell.startswith("held-out check kept " + ("DSnoT" if dsnot_wins else "wanda alone"))
    want = dict((free if dsnot_wins else base).family.iter_linears((free if dsnot_wins else base).model))
    for n, b in lm.family.iter_linears(lm.model):
        assert torch.equal(b.weight, want[n].weight), n
    assert s["swaps"] == (s["heldout"]["swaps"] if dsnot_wins else 0)


def test_compare_is_refused_where_there_is_no_pruning_pass(pruned_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="accept=heldout"):
        repair_dsnot_checkpoint(pruned_ckpt, tmp_path / "r", DSnoTConfig(accept="compare"), protocol="test")
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="cannot be combined"):
        make_config({"accept": "compare", "guard": "block"})


def test_heldout_acceptance_keeps_the_better_model_on_real_heldout_windows():
    from sparse_runtime.eval.perplexity import perplexity_from_ids
    from sparse_runtime.prune import PruneConfig, prune_model
    from sparse_runtime.repair.dsnot_heldout import heldout_ids

    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    lm = _tiny()
    ref = DSnoTRefiner(threshold=0.0, accept="heldout", heldout_windows=2)
    prune_model(lm.model, lm.tokenizer, PruneConfig(method="wanda", sparsity=0.5, protocol="test"), calib_ids=ids,
                refiner=ref)
    h = ref.summary()["heldout"]
    assert h["set"] == "c4" and h["windows"] == 2 and h["seconds"] > 0
    held = heldout_ids(lm.tokenizer, "c4", 2, h["seqlen"], 1000, None)
    final = perplexity_from_ids(lm.model, held, h["seqlen"]).ppl
    assert final == pytest.approx(min(h["ppl_dsnot"], h["ppl_pruner"]), rel=1e-6)


def test_heldout_acceptance_options():
    assert DSnoTConfig().accept == "always" and make_config({"preset": "official"}).accept == "always"
    c = make_config({"accept": "heldout", "heldout": "wikitext2-valid", "heldout_windows": 8.0})
    assert (c.accept, c.heldout, c.heldout_windows) == ("heldout", "wikitext2-valid", 8)
    with pytest.raises(ConfigError, match="accept"):
        make_config({"accept": "sometimes"})
    with pytest.raises(ConfigError, match="never a test set"):
        make_config({"accept": "heldout", "heldout": "wikitext2-test"})
    with pytest.raises(ConfigError, match="heldout_windows"):
        make_config({"heldout_windows": 0})
    with pytest.raises(ConfigError, match="cannot be combined"):
        make_config({"accept": "heldout", "guard": "block"})


@pytest.mark.parametrize("dsnot_wins", [False, True])
def test_heldout_acceptance_in_standalone_repair(pruned_ckpt, tmp_path, monkeypatch, dsnot_wins):
    calls = _forced_ppl(monkeypatch, 1.0 if dsnot_wins else 2.0, 1.5)
    out = tmp_path / "repaired"
    rep = repair_dsnot_checkpoint(pruned_ckpt, out, DSnoTConfig(threshold=0.0, accept="heldout", heldout_windows=2),
                                  protocol="test")
    assert len(calls) == 2 and rep.summary["heldout"]["kept"] == dsnot_wins
    lm, src = sr.load_model(out), sr.load_model(pruned_ckpt)
    same = [torch.equal(a.weight, b.weight) for (_, a), (_, b) in zip(src.family.iter_linears(src.model),
                                                                        lm.family.iter_linears(lm.model))]
    assert all(same) != dsnot_wins  # reverted: exactly the input checkpoint; kept: DSnoT's masks
    assert rep.summary["swaps"] == (rep.summary["heldout"]["swaps"] if dsnot_wins else 0)


def test_heldout_acceptance_refuses_atp_early():
    from sparse_runtime.prune import PruneConfig, prune_model

    lm = _tiny()
    with pytest.raises(ConfigError, match="accept=always"):
        prune_model(lm.model, lm.tokenizer, PruneConfig(method="wanda", sparsity=0.5, protocol="test", allocation="atp"),
                    refiner=DSnoTRefiner(accept="heldout"))
