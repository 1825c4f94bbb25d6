"""SEFT: the sparse-delta gradient against autograd's dense gradient, exact sparsity and N:M after
every evolution step (layer / row / global scopes, both N:M modes), fixed topology without
evolution, no growth at pruned positions without resurrection, exact merge, exact resume, bad input."""
import json
import shutil

import pytest
import torch
from torch import nn

import sparse_runtime as sr
from sparse_runtime.adapters import SEFTAdapter, SEFTConfig, SEFTEvolution, iter_adapters
from sparse_runtime.errors import ConfigError
from sparse_runtime.merge import merge_adapter_dir
from sparse_runtime.sparsity import NMPattern, nm_compliant, topk_prune_mask
from sparse_runtime.training import TrainConfig, finetune
from helpers import save_tiny_pruned


def pruned_checkpoint(path, structure="unstructured", family="llama"):
    return save_tiny_pruned(path, family, structure)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("seft")
    return {"unstructured": pruned_checkpoint(root / "u"), "2:4": pruned_checkpoint(root / "nm", "2:4")}


def cfg(**kw):
    d = dict(method="seft", data="c4", steps=6, batch_size=2, seq_len=32, lr=2e-3)
    d.update(kw)
    return TrainConfig(**d)


SEFT = dict(rank=2, update_every=2, accumulation_steps=2, init_samples=4, drop_rate=0.5)


# -- the gradient of the sparse deltas ------------------------------------------------------------
def test_chunk_plan_groups_slots_and_is_cached_until_the_index_set_changes():
    from sparse_runtime.adapters.seft import chunk_plan, sampled_grad

    g = torch.Generator().manual_seed(1)
    out_f, in_f, chunk = 23, 7, 5
    idx = torch.randperm(out_f * in_f, generator=g)[:40]
    order, blocks = chunk_plan(idx, in_f, out_f, chunk)
    rows = idx // in_f
    assert sorted(order.tolist()) == list(range(40))
    for r0, r1, a, b in blocks:  # each block's slots are exactly those with rows in [r0, r1)
        assert b > a and torch.all((rows[order[a:b]] >= r0) & (rows[order[a:b]] < r1))
    assert sum(b - a for _, _, a, b in blocks) == 40
    g2, x2 = torch.randn(9, out_f, generator=g), torch.randn(9, in_f, generator=g)
    torch.testing.assert_close(sampled_grad(g2, x2, idx, in_f, "chunked", chunk), (g2.t() @ x2).reshape(-1)[idx])
    lin = nn.Linear(in_f, out_f, bias=False)
    ad = SEFTAdapter(lin, SEFTConfig(density=0.2, grad_chunk=chunk, init="random"), "l")
    p1 = ad.grad_plan(ad.delta_index)
    assert ad.grad_plan(ad.delta_index) is p1  # cached
    with torch.no_grad():
        ad.delta_index[:1] = (ad.delta_index[:1] + 1) % (out_f * in_f)  # an evolution-style in-place edit
    assert ad.grad_plan(ad.delta_index) is not p1


@pytest.mark.parametrize("shape", [(6, 8), (16, 12), (33, 20), (64, 40)])
@pytest.mark.parametrize("impl", ["chunked", "sampled"])
def test_delta_gradient_equals_dense_gradient_at_I(shape, impl):
    out_f, in_f = shape
    g = torch.Generator().manual_seed(out_f)
    lin = nn.Linear(in_f, out_f, bias=True).double()
    with torch.no_grad():
        lin.weight.mul_(torch.rand(out_f, in_f, generator=g) > 0.5)
    ad = SEFTAdapter(lin, SEFTConfig(density=0.2, grad_impl=impl, grad_chunk=5, init="random"), "l")
    with torch.no_grad():
        ad.delta.copy_(torch.randn(ad.slots, generator=g))
        pruned = (~ad.mask).reshape(-1).nonzero().squeeze(1)[:3]
        ad.mask.reshape(-1)[pruned] = True  # resurrected positions
        ad.fold(pruned[:1], torch.tensor([0.3]))
        ad.delta_index[:2] = pruned[1:]  # deltas at resurrected positions too
        ad.mask.reshape(-1)[ad.delta_index[2]] = False  # and one delta at a (re-)pruned position
    x = torch.randn(3, 5, in_f, dtype=torch.double, generator=g, requires_grad=True)
    y = ad(x)
    gy = torch.randn(y.shape, dtype=y.dtype, generator=g)
    (y * gy).sum().backward()
    # reference: autograd through the dense masked weight
    W = lin.weight.detach().clone().requires_grad_(True)
    dense = torch.zeros(out_f * in_f, dtype=torch.double)
    dense.index_add_(0, ad.fold_index, ad.fold_value.double())
    dense.index_add_(0, ad.delta_index, ad.delta.detach().double())
    x2 = x.detach().clone().requires_grad_(True)
    yr = nn.functional.linear(x2, (W + dense.view(out_f, in_f)) * ad.mask, lin.bias)
    (yr * gy).sum().backward()
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, x2.grad)
    ref = W.grad.reshape(-1)[ad.delta_index]  # dL/dW_eff-side gradient of W + scatter(I, d), sampled at I
    torch.testing.assert_close(ad.delta.grad.double(), ref, rtol=1e-5, atol=1e-6)
    assert ad.delta.grad[2] == 0  # masked position: no gradient
    torch.testing.assert_close(ad.merged_weight().double(), ((W + dense.view(out_f, in_f)) * ad.mask).detach())


def test_trainable_size_and_schedule():
    lin = nn.Linear(40, 24, bias=False)
    with torch.no_grad():
        lin.weight.mul_(topk_prune_mask(lin.weight.abs(), 0.5, per_row=True))
    ad = SEFTAdapter(lin, SEFTConfig(rank=3), "l")
    assert ad.slots == 3 * (40 + 24) and ad.trainable_count() == ad.slots  # LoRA-matched
    assert [n for n, p in ad.named_parameters() if p.requires_grad] == ["delta"]
    assert SEFTAdapter(lin, SEFTConfig(density=0.1), "l").slots == 96
    c = SEFTConfig(drop_rate=0.2)
    assert c.drop_fraction(0, 100) == pytest.approx(0.2) and c.drop_fraction(100, 100) == pytest.approx(0.0)
    assert c.drop_fraction(50, 100) == pytest.approx(0.1)
    assert SEFTConfig(drop_rate=0.2, drop_schedule="linear").drop_fraction(25, 100) == pytest.approx(0.15)


# -- the evolution keeps the sparsity exact --------------------------------------------------------
def _record(monkeypatch):
    """Wrap the evolution step: after each call, snapshot every layer's mask and index set."""
    snaps = []
    orig = SEFTEvolution.evolve

    def wrapped(self, trainer, ads, step):
        rec = orig(self, trainer, ads, step)
        snaps.append((step, rec, {n: (a.mask.clone(), a.delta_index.clone(), a.base.weight.detach() != 0)
                                  for n, a in ads.items()}))
        return rec
    monkeypatch.setattr(SEFTEvolution, "evolve", wrapped)
    return snaps


@pytest.mark.parametrize("structure,opts", [
    ("unstructured", {"scope": "layer"}), ("unstructured", {"scope": "row"}), ("unstructured", {"scope": "global"}),
    ("2:4", {"nm_mode": "group"}), ("2:4", {"nm_mode": "active"})])
def test_sparsity_exact_after_every_evolution_step(tmp_path, bases, monkeypatch, structure, opts):
    snaps = _record(monkeypatch)
    res, lm = finetune(bases[structure], tmp_path / "a", cfg(), {**SEFT, **opts})
    assert [s for s, _, _ in snaps] == [2, 4]
    total_res = 0
    for step, rec, layers in snaps:
        assert rec["regrown"] > 0
        total_res += rec["resurrected"]
        assert rec["repruned"] == rec["resurrected"]
        tot_now = tot_base = 0
        for n, (m, idx, m0) in layers.items():
            tot_now, tot_base = tot_now + int(m.sum()), tot_base + int(m0.sum())
            assert idx.unique().numel() == idx.numel()  # no duplicate slots
            assert bool(m.reshape(-1)[idx].all())  # every delta is at a kept position
            if structure == "2:4":
                assert nm_compliant(m, NMPattern(2, 4))
                assert torch.equal(m.reshape(-1, 4).sum(1), m0.reshape(-1, 4).sum(1))
                if opts["nm_mode"] == "active":
                    assert torch.equal(m, m0)
            elif opts["scope"] == "row":
                assert torch.equal(m.sum(1), m0.sum(1))
            elif opts["scope"] == "layer":
                assert int(m.sum()) == int(m0.sum())
        assert tot_now == tot_base
    if opts.get("nm_mode") == "active":
        assert total_res == 0
    else:
        assert total_res > 0  # pruned weights were resurrected


def test_evolution_disabled_is_fixed_topology(tmp_path, bases, monkeypatch):
    initial = {}
    orig = SEFTEvolution.on_train_begin

    def begin(self, trainer, resumed):
        orig(self, trainer, resumed)
        initial.update({n: a.delta_index.clone() for n, a in trainer.adapters.items()})
    monkeypatch.setattr(SEFTEvolution, "on_train_begin", begin)
    lm0 = sr.load_model(bases["unstructured"])
    res, lm = finetune(bases["unstructured"], tmp_path / "a", cfg(steps=4), {**SEFT, "evolve": False})
    for (n, lin0), (_, ad) in zip(lm0.family.iter_linears(lm0.model), iter_adapters(lm.model)):
        assert torch.equal(ad.mask, lin0.weight != 0)
        assert ad.fold_index.numel() == 0
        assert torch.equal(ad.delta_index, initial[n])  # the gradient-chosen index set never moves
        assert bool(ad.mask.reshape(-1)[ad.delta_index].all())
        assert bool((ad.delta != 0).any())
    out, rep = merge_adapter_dir(tmp_path / "a", tmp_path / "m")
    m = sr.read_manifest(out)
    base = sr.read_manifest(bases["unstructured"])
    assert all(m.layers[n].mask_sha256 == base.layers[n].mask_sha256 for n in base.layers)
    assert res.losses[-1] < res.losses[0]


def test_no_resurrection_never_grows_at_pruned_positions(tmp_path, bases, monkeypatch):
    snaps = _record(monkeypatch)
    finetune(bases["unstructured"], tmp_path / "a", cfg(), {**SEFT, "resurrection": False})
    assert len(snaps) == 2
    for _, rec, layers in snaps:
        assert rec["resurrected"] == 0 and rec["regrown"] > 0
        for n, (m, idx, m0) in layers.items():
            assert torch.equal(m, m0)
            assert bool(m0.reshape(-1)[idx].all())


# -- merge ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure,opts", [("unstructured", {}), ("2:4", {"nm_mode": "group"}),
                                            ("unstructured", {"scope": "global"})])
def test_merge_is_exact(tmp_path, bases, structure, opts):
    res, lm = finetune(bases[structure], tmp_path / "a", cfg(steps=6), {**SEFT, **opts})
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = lm.model(ids).logits
    out, rep = merge_adapter_dir(tmp_path / "a", tmp_path / "m")
    merged = sr.load_model(out)  # verifies the manifest against the weights
    base = sr.read_manifest(bases[structure])
    man = merged.manifest
    evo = rep.as_dict()["mask_evolution"]
    changed = 0
    for n, lin in merged.family.iter_linears(merged.model):
        nnz = int((lin.weight != 0).sum())
        if opts.get("scope") != "global":
            assert nnz == base.layers[n].nnz
        if structure == "2:4":
            assert nm_compliant(lin.weight, NMPattern(2, 4))
        assert evo[n]["resurrected"] >= 0
        changed += evo[n]["resurrected"]
        if opts.get("scope") != "global":
            assert evo[n]["resurrected"] == evo[n]["newly_pruned"]
    assert sum(r.nnz for r in man.layers.values()) == sum(r.nnz for r in base.layers.values())
    assert changed > 0 and rep.kept_zero_fixups == 0
    assert man.history[-1]["merge"]["mask_evolution"] == evo
    with torch.no_grad():
        after = merged.model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


# -- resume ---------------------------------------------------------------------------------------
def test_resume_reproduces_loss_curve(tmp_path, bases):
    opts = dict(SEFT, update_every=3)
    c = cfg(steps=7, batch_size=4, micro_batch_size=2, save_every=2, keep_checkpoints=10)
    full, lmf = finetune(bases["unstructured"], tmp_path / "full", c, opts)
    for cut in (2, 4):  # step 2 is inside a growth window (steps 2-3), step 4 just opened one (5-6)
        part = tmp_path / f"part{cut}"
        shutil.copytree(tmp_path / "full", part)
        for ck in (part / "checkpoints").glob("step-*"):
            if int(ck.name.split("-")[1]) > cut:
                shutil.rmtree(ck)
        st = json.loads((part / "checkpoints" / f"step-{cut:06d}" / "trainer_state.json").read_text())
        assert st["callbacks"][0]["capture_open"] is True
        resumed, lmr = finetune(bases["unstructured"], part, c, opts, resume=True)
        assert resumed.resumed_from.endswith(f"step-{cut:06d}")
        assert resumed.losses == full.losses
        assert (part / "adapter_model.safetensors").read_bytes() == (tmp_path / "full" / "adapter_model.safetensors").read_bytes()


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts,match", [({"density": 0.0}, "density"), ({"density": 0.9}, "kept"),
                                        ({"update_every": 0}, "update_every"), ({"rank": 0}, "rank"),
                                        ({"accumulation_steps": 5, "update_every": 3}, "accumulation_steps"),
                                        ({"mask_source": "weights"}, "stored"), ({"scope": "model"}, "scope")])
def test_bad_input_fails_before_training(tmp_path, bases, opts, match):
    with pytest.raises(ConfigError, match=match):
        finetune(bases["unstructured"], tmp_path / "a", cfg(), {**SEFT, **opts})
    assert not (tmp_path / "a" / "train_log.jsonl").exists()


def test_global_scope_on_nm_model_is_refused(tmp_path, bases):
    with pytest.raises(ConfigError, match="N:M"):
        finetune(bases["2:4"], tmp_path / "a", cfg(), {**SEFT, "scope": "global"})
    assert not (tmp_path / "a" / "train_log.jsonl").exists()


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_seft_then_merge(tmp_path, bases):
    from sparse_runtime.cli import main

    base = bases["unstructured"]
    rc = main(["finetune", str(base), "--method", "seft", "--data", "c4", "--steps", "4", "--batch-size", "2", "--seq-len", "32",
               "--rank", "2", "--update-every", "2", "--accumulation-steps", "1", "--seft-init-samples", "2",
               "--scope", "row", "--out", str(tmp_path / "ad")])
    assert rc == 0
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["method"] == "seft" and meta["config"]["scope"] == "row" and meta["config"]["update_every"] == 2
    assert main(["merge", str(tmp_path / "ad"), "--out", str(tmp_path / "m")]) == 0
    m = sr.read_manifest(tmp_path / "m")
    assert m.history[-1]["method"] == "seft" and "mask_evolution" in m.history[-1]["merge"]
    # SEFT's defaults when no SEFT option is given
    rc = main(["finetune", str(base), "--method", "seft", "--data", "c4", "--steps", "1", "--batch-size", "2",
               "--seq-len", "32", "--rank", "2", "--out", str(tmp_path / "ad2")])
    assert rc == 0
    assert main(["finetune", str(base), "--method", "seft", "--data", "c4", "--steps", "1", "--update-every", "0",
                 "--out", str(tmp_path / "x")]) == 2


def test_one_route_per_method_and_every_option_explained(tmp_path, capsys):
    """`finetune --method M` is the only route (no `seft`/`losa` commands); an option of another
    method is one line before anything is loaded; every finetune option has a help string."""
    from sparse_runtime.cli import build_parser, main

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "finetune" in sub.choices and "seft" not in sub.choices and "losa" not in sub.choices
    ft = sub.choices["finetune"]
    assert all(a.help for a in ft._actions if a.option_strings), [a.option_strings for a in ft._actions if not a.help]
    for argv, flag in ((["--method", "seft", "--grad-mode", "exact"], "--grad-mode"),
                       (["--method", "seft", "--alpha", "4"], "--alpha"),
                       (["--method", "lors", "--density", "0.1"], "--density"),
                       (["--method", "masked-lora", "--sparsity", "0.5"], "--sparsity"),
                       (["--method", "losa", "--sparsity", "0.5", "--eval-every", "2"], "--eval-every")):
        capsys.readouterr()
        assert main(["finetune", str(tmp_path / "nope"), *argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert flag in err and "does not apply" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_recipe_owl_prune_then_seft_keeps_the_allocation(tmp_path):
    """prune (OWL allocation) -> finetune seft (layer scope) -> merged: every layer keeps its count."""
    from sparse_runtime.recipe import Recipe, run_recipe

    recipe = Recipe.from_dict({"name": "t", "model": "tiny-llama", "protocol": "test", "steps": [
        {"stage": "prune", "method": "wanda", "sparsity": 0.6, "allocation": "owl", "owl_lambda": 0.05},
        {"stage": "finetune", "method": "seft", "data": "c4", "steps": 4, "batch_size": 2, "seq_len": 32, "rank": 2,
         "adapter": {"update_every": 2, "accumulation_steps": 1, "init_samples": 2, "drop_rate": 0.5}, "merge": True},
    ]})
    ctx = run_recipe(recipe, tmp_path / "run")
    pruned = sr.read_manifest(ctx.results[0]["output_model"])
    merged = sr.load_model(ctx.model).manifest
    assert {n: r.nnz for n, r in merged.layers.items()} == {n: r.nnz for n, r in pruned.layers.items()}
    assert sum(v["resurrected"] for v in merged.history[-1]["merge"]["mask_evolution"].values()) > 0
