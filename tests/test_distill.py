"""Distillation from the dense model (training/distill.py): each term against a plain reference,
chunking, w = 0, a short fine-tune with distillation for two methods followed by an exact merge,
and the missing-teacher error."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse_runtime as sr
from sparse_runtime.errors import ConfigError
from sparse_runtime.training import TrainConfig, finetune
from sparse_runtime.training.data import IGNORE
from sparse_runtime.training.distill import Distiller
from sparse_runtime.training.loss import CausalLMLoss
from helpers import save_tiny_pruned, tiny_pruned


def _batch(seed=0, b=2, t=12, vocab=256):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :4] = IGNORE  # a prompt whose positions carry no loss
    labels[1, -3:] = IGNORE
    return ids, labels


@pytest.fixture(scope="module")
def pair():
    """(student: tiny-llama pruned 50 % by magnitude, teacher: the dense tiny-llama), both fp32."""
    student, _ = tiny_pruned("llama")
    teacher = sr.load_model("tiny-llama").model.eval().requires_grad_(False)
    return student.model.eval(), teacher


def _valid(labels):
    return (labels[:, 1:] != IGNORE).reshape(-1)


def test_kl_term_equals_plain_reference(pair):
    student, teacher = pair
    ids, labels = _batch()
    loss_mod = CausalLMLoss(student, 0, Distiller(teacher, "logits", 1.0, 2.0))
    loss, n = loss_mod(ids, labels)
    loss = loss.detach()
    # reference: full-vocabulary softmax / log_softmax over the whole batch, temperature 2
    s = student(input_ids=ids).logits[:, :-1].reshape(-1, 256).double()
    with torch.no_grad():
        t = teacher(input_ids=ids).logits[:, :-1].reshape(-1, 256).double()
    p_t = torch.softmax(t / 2.0, -1)
    kl = (p_t * (torch.log_softmax(t / 2.0, -1) - torch.log_softmax(s / 2.0, -1))).sum(-1)
    v = _valid(labels)
    ref = 4.0 * kl[v].sum().detach()
    assert int(n) == int(v.sum())
    # fp32 against float64: the KL of two near-equal distributions is a small difference of large terms
    assert float(loss) == pytest.approx(float(ref), rel=2e-4, abs=1e-6)
    ce_ref = F.cross_entropy(s, labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")
    assert float(loss_mod.last_parts[0]) == pytest.approx(float(ce_ref.detach()), rel=1e-5)
    assert float(loss_mod.last_parts[2]) == 0.0


def test_chunked_equals_unchunked(pair):
    student, teacher = pair
    ids, labels = _batch(1)
    student.requires_grad_(False)
    w = student.model.layers[0].mlp.down_proj.weight
    w.requires_grad_(True)
    out = []
    for chunk in (0, 5):  # 0: one chunk holds every position (fewer than the default 1024)
        w.grad = None
        loss, _ = CausalLMLoss(student, chunk, Distiller(teacher, "both", 0.3, 2.0, student=student))(ids, labels)
        loss.backward()
        out.append((loss.detach(), w.grad.clone()))
    w.requires_grad_(False)
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-4, atol=1e-7)


def test_gradient_checkpointing_gives_the_same_loss_and_gradient(pair):
    """The student's hooks must ignore the recomputation of a checkpointed backward; the teacher is not
    checkpointed at all."""
    student, teacher = pair
    ids, labels = _batch(4)
    student.requires_grad_(False)
    w = student.model.layers[0].self_attn.v_proj.weight
    w.requires_grad_(True)
    out = []
    student.train()
    try:
        for ckpt in (False, True):
            if ckpt:
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            w.grad = None
            d = Distiller(teacher, "both", 0.5, 2.0, student=student)
            loss, _ = CausalLMLoss(student, 8, d)(ids, labels)
            loss.backward()
            d.close()
            out.append((loss.detach(), w.grad.clone()))
    finally:
        student.gradient_checkpointing_disable()
        student.eval()
        w.requires_grad_(False)
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-8)


def test_block_term_equals_reference_from_hidden_states(pair):
    student, teacher = pair
    ids, labels = _batch(2)
    student.requires_grad_(False)
    w = student.model.layers[1].self_attn.q_proj.weight
    w.requires_grad_(True)
    d = Distiller(teacher, "blocks", 1.0, 1.0, student=student)
    loss, n = CausalLMLoss(student, 0, d)(ids, labels)
    (g,) = torch.autograd.grad(loss, w)
    d.close()
    # reference: output_hidden_states with the final norm taken out, so entry l is block l's raw output
    m = (labels[:, 1:] != IGNORE).double()
    saved = (student.model.norm, teacher.model.norm)
    student.model.norm, teacher.model.norm = nn.Identity(), nn.Identity()
    try:
        hs = student(input_ids=ids, output_hidden_states=True).hidden_states[1:]
        with torch.no_grad():
            ht = teacher(input_ids=ids, output_hidden_states=True).hidden_states[1:]
    finally:
        student.model.norm, teacher.model.norm = saved
    assert len(hs) == len(student.model.layers)
    ref = sum(((a[:, :-1].double() - b[:, :-1].double()).pow(2).sum(-1) * m).sum()
              / (b[:, :-1].double().pow(2).sum(-1) * m).sum() for a, b in zip(hs, ht))
    assert float(loss.detach()) == pytest.approx(float(n) * float(ref.detach()), rel=1e-5)
    (g_ref,) = torch.autograd.grad(float(n) * ref, w)
    w.requires_grad_(False)
    torch.testing.assert_close(g.double(), g_ref.double(), rtol=1e-4, atol=1e-9)


def test_weight_zero_is_exactly_the_ce(pair):
    student, teacher = pair
    ids, labels = _batch(3)
    for chunk in (0, 4):
        plain, n0 = CausalLMLoss(student, chunk if chunk else 1024)(ids, labels)
        dist, n1 = CausalLMLoss(student, chunk, Distiller(teacher, "both", 0.0, 2.0, student=student))(ids, labels)
        assert int(n0) == int(n1)
        assert torch.equal(plain.detach(), dist.detach())


@pytest.mark.parametrize("method,opts,extra", [
    ("masked-lora", {"rank": 4}, {"gradient_checkpointing": True, "distill": "both"}),
    ("seft", {"rank": 4, "update_every": 1, "accumulation_steps": 1, "init_samples": 2}, {"distill": "logits"}),
])
def test_finetune_with_distillation_then_exact_merge(tmp_path, method, opts, extra):
    base = save_tiny_pruned(tmp_path / "base", "llama", with_targets=True)  # manifest base_model: tiny-llama
    cfg = TrainConfig(method=method, data="c4", steps=2, batch_size=2, micro_batch_size=1, seq_len=32, lr=1e-3,
                      distill_weight=0.5, distill_temperature=2.0, **extra)
    res, _ = finetune(base, tmp_path / "ad", cfg, opts)
    assert res.steps == 2
    log = [json.loads(l) for l in (tmp_path / "ad" / "train_log.jsonl").read_text().splitlines()]
    assert all({"ce", "kd_logits", "kd_blocks"} <= set(r) for r in log)
    assert log[0]["kd_logits"] > 0 and (log[0]["kd_blocks"] > 0) == (extra["distill"] == "both")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["train"]["distill_teacher"] == "tiny-llama"
    out, rep = sr.merge.merge_adapter_dir(tmp_path / "ad", tmp_path / "merged")
    base_man, merged = sr.read_manifest(base), sr.load_model(out)
    for name, lin in merged.family.iter_linears(merged.model):
        assert int((lin.weight != 0).sum()) == base_man.layers[name].nnz, name


@pytest.mark.filterwarnings("ignore:the model has no sparsity manifest")
def test_missing_teacher_is_one_clear_line(tmp_path, capsys):
    base = save_tiny_pruned(tmp_path / "base", "llama", manifest=False)
    cfg = TrainConfig(method="lors", data="c4", steps=1, batch_size=1, seq_len=32, distill="logits")
    with pytest.raises(ConfigError, match="--distill-teacher PATH"):
        finetune(base, tmp_path / "ad", cfg, {"rank": 2, "init_samples": 1})
    assert not (tmp_path / "ad").exists()
    from sparse_runtime.cli import main

    rc = main(["finetune", str(base), "--method", "lors", "--data", "c4", "--steps", "1", "--batch-size", "1",
               "--seq-len", "32", "--distill", "logits", "--out", str(tmp_path / "ad2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len([l for l in err if "distill" in l]) == 1 and "--distill-teacher" in err[-1]
    with pytest.raises(ConfigError, match="--distill-teacher is given but --distill is none"):
        TrainConfig(distill_teacher="x").validate()


# ---------------------------------------------------------------------------------------------
# the fused recipes (recipes/fused-*.yaml)
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _tiny_version(path):
    """The recipe with the tiny model, the `test` protocol and a two-step fine-tuning budget at rank 1
    (rank 8 asks SEFT for more deltas than a 64-wide tiny layer keeps under ATP at 70 %); every stage,
    method and option otherwise as shipped."""
    from sparse_runtime.recipe import Recipe

    r = Recipe.from_yaml(path)
    r.model, r.protocol = "tiny-llama", "test"
    r.steps = [(name, dict(opts, steps=2, batch_size=2, seq_len=32, loss_chunk_tokens=16, save_every=0, rank=1,
                           adapter={"init_samples": 2}) if name == "finetune" else opts)
               for name, opts in r.steps if name != "report"]
    return r


@pytest.mark.parametrize("name", ["fused-50", "fused-70", "fused-2of4"])
def test_fused_recipes_validate(name):
    from sparse_runtime.recipe import Recipe

    r = Recipe.from_yaml(RECIPES / f"{name}.yaml")
    r.validate()
    stages = [s for s, _ in r.steps]
    assert stages.index("prune") < stages.index("repair") < stages.index("finetune") < stages.index("merge")
    assert dict(r.steps)["finetune"]["distill"] != "none"
    assert stages.count("evaluate") == 4  # dense, one-shot, + DSnoT, + fine-tuning (merged): every stage's ppl


def test_fused_2of4_recipe_end_to_end_on_tiny_model(tmp_path, data_dir):
    from sparse_runtime.recipe import run_recipe
    from sparse_runtime.sparsity import NMPattern, nm_compliant

    ctx = run_recipe(_tiny_version(RECIPES / "fused-2of4.yaml"), tmp_path)
    ppl = [rec["metrics"]["perplexity"]["ppl"] for rec in ctx.results if rec["stage"] == "evaluate"]
    assert len(ppl) == 4 and all(p > 1 for p in ppl)
    ft = next(rec for rec in ctx.results if rec["stage"] == "finetune")
    assert ft["metrics"]["distill"] == "both" and ft["metrics"]["steps"] == 2
    merged = sr.load_model(ctx.model)
    pruned = sr.read_manifest(next(rec for rec in ctx.results if rec["stage"] == "prune")["output_model"])
    for name, lin in merged.family.iter_linears(merged.model):
        assert nm_compliant(lin.weight.detach(), NMPattern(2, 4)), name
        assert int((lin.weight != 0).sum()) == pruned.layers[name].nnz, name


def test_losa_with_distillation_from_its_dense_input(data_dir, monkeypatch):
    """LoSA trains through the same engine: its rounds take the teacher (the dense model it starts from)."""
    from sparse_runtime.losa import LoSAConfig
    from sparse_runtime.losa.rounds import run_losa_model
    from sparse_runtime.training import engine

    seen = []
    orig = engine.Trainer.train

    def train(self, *a, **k):
        seen.append(self.distiller is not None and self.distiller.teacher is not None)
        return orig(self, *a, **k)

    monkeypatch.setattr(engine.Trainer, "train", train)
    lm = sr.load_model("tiny-llama")
    cfg = LoSAConfig(protocol="test", steps=2, rounds=2, train_batch_size=2, seq_len=32, rank=4, r_max=8,
                     sparsity=0.5, data="c4", dropout=0.0, distill="both")
    res = run_losa_model(lm, cfg, data_dir=data_dir)
    assert seen == [True, True] and cfg.distill_teacher == "tiny-llama"
    assert res.sparsity_measured == pytest.approx(0.5, abs=0.02)


def test_fused_benchmark_registry(monkeypatch):
    """benchmarks/bench_fused.py: tier 1 (what decides the table) is every distillation mode with SEFT on the
    candidate base of each sparsity; names select by tier and pattern."""
    monkeypatch.syspath_prepend(str(RECIPES.parent / "benchmarks"))
    import bench_fused as bf
    from bench_ft_quick import Budget

    tier1 = [n for n, c in bf.CONFIGS.items() if c.tier == 1]
    assert len(tier1) == 12 and {bf.CONFIGS[n].distill for n in tier1} == {"none", "logits", "blocks", "both"}
    assert {bf.CONFIGS[n].base for n in tier1} == set(bf.CANDIDATE.values())
    budget = Budget(200, 8, 512)
    assert bf.select("tier1", set(), budget) == tier1
    assert bf.select("*2:4+dsnot+seft+kd-*", set(), budget) == [
        "sparsegpt-2:4+dsnot+seft+kd-logits", "sparsegpt-2:4+dsnot+seft+kd-blocks", "sparsegpt-2:4+dsnot+seft+kd-both",
        "wanda-2:4+dsnot+seft+kd-both"]
