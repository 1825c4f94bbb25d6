"""Small builders shared by several test modules (pytest puts this folder on ``sys.path``)."""
from __future__ import annotations

from pathlib import Path

import torch

import sparse_runtime as sr
from sparse_runtime.sparsity import NMPattern, nm_prune_mask, topk_prune_mask


def tiny_pruned(family: str = "llama", structure: str = "unstructured", sparsity: float = 0.5,
                with_targets: bool = False):
    """A tiny random model of ``family`` pruned by magnitude (per row, or 2:4), and its manifest.

    Magnitude keeps the fixture cheap and deterministic; the tests that use it check invariants
    (sparsity, pattern, logits), not pruning quality."""
    lm = sr.load_model(f"tiny-{family}")
    structures, targets = {}, {}
    with torch.no_grad():
        for n, lin in lm.family.iter_linears(lm.model):
            if structure == "2:4":
                keep = nm_prune_mask(lin.weight.abs(), NMPattern(2, 4))
                structures[n] = "2:4"
            else:
                keep = topk_prune_mask(lin.weight.abs(), sparsity, per_row=True)
            targets[n] = sparsity
            lin.weight.mul_(keep)
    man = sr.build_manifest(lm.model, lm.family, structures=structures, targets=targets if with_targets else None,
                            base_model=f"tiny-{family}")
    return lm, man


def save_tiny_pruned(path: Path, family: str = "llama", structure: str = "unstructured", sparsity: float = 0.5,
                     with_targets: bool = False, manifest: bool = True) -> Path:
    """:func:`tiny_pruned` written as a checkpoint at ``path`` (optionally without its manifest)."""
    lm, man = tiny_pruned(family, structure, sparsity, with_targets)
    sr.save_checkpoint(lm.model, lm.tokenizer, path, man)
    if not manifest:
        (Path(path) / "sparsity_manifest.json").unlink()
    return Path(path)


@torch.no_grad()
def compare_with_hf(model, lean, prompt: int = 12, steps: int = 20, batch: int = 1, seed: int = 0,
                    atol: float = 2e-5) -> None:
    """Prefill then ``steps`` decode steps of a lean engine, each compared with ``model``'s (Hugging
    Face's) cached forward on the same random tokens (the lean-path tests' oracle)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, prompt), generator=g)
    ref = model(ids, use_cache=True)
    torch.testing.assert_close(lean.prefill(ids), ref.logits, atol=atol, rtol=0)
    cache = ref.past_key_values
    for _ in range(steps):
        tok = torch.randint(0, 256, (batch, 1), generator=g)
        r = model(tok, past_key_values=cache, use_cache=True)
        cache = r.past_key_values
        torch.testing.assert_close(lean.decode(tok), r.logits, atol=atol, rtol=0)


def mixed_pruned(family: str = "llama", dtype: torch.dtype = torch.float32):
    """A tiny model with every inspect case at once: half the layers 2:4, the others unstructured at
    70 %, one (the 4th) left dense; returns (loaded model, its manifest)."""
    lm = sr.load_model(f"tiny-{family}")
    structures = {}
    with torch.no_grad():
        for i, (n, lin) in enumerate(lm.family.iter_linears(lm.model)):
            if i == 3:
                continue
            if i % 2:
                lin.weight.mul_(nm_prune_mask(lin.weight.abs(), NMPattern(2, 4)))
                structures[n] = "2:4"
            else:
                lin.weight.mul_(topk_prune_mask(lin.weight.abs(), 0.7, per_row=True))
    lm.model.to(dtype)
    return lm, sr.build_manifest(lm.model, lm.family, structures=structures, base_model=f"tiny-{family}")


def random_pruned(model, sparsity: float = 0.7, seed: int = 0):
    """``model`` with every 2-D weight but the embedding and lm_head zeroed at random (``sparsity``
    of them, seeded): the engines' tests need sparse weights, not good masks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in n and "lm_head" not in n:
                p.mul_((torch.rand(p.shape, generator=g) >= sparsity).float())
    return model


def pruned_weight(N: int, K: int, sparsity, seed: int = 0) -> torch.Tensor:
    """A random [N, K] weight at ``sparsity`` (or 2:4), rows 3 and 5 empty (N > 5): the quantized
    kernels' tests run it on odd shapes, empty rows and every sparsity."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    if sparsity == "2:4":
        grp = w[:, :K // 4 * 4].reshape(N, -1, 4)
        keep = grp.abs().topk(2, dim=-1).indices
        grp.mul_(torch.zeros_like(grp).scatter_(-1, keep, 1.0))
        w[:, K // 4 * 4:] = 0
    else:
        w = w * (torch.rand(N, K, generator=g) >= sparsity)
    w[3] = 0
    w[5] = 0
    return w


def fused_bf16_prefill(monkeypatch, form: str, dtype=None):
    """A pruned tiny Llama prefilled twice on the AVX-512 path: in fp32 (``ref``) and with
    ``prefill_dtype='bfloat16'`` with ``choose_prefill_form`` forced to ``form`` (a fused bf16 form:
    "amx", "bf16walk"); checks that every product ran ``form`` and that the logits stay within bf16
    rounding of fp32 (top token mostly kept), also for the prompt fed to a serving slot in two chunks.
    Returns ``(model, LeanConfig options, ids, bf16 logits)``; the monkeypatch stays active for the
    caller. Skips off the AVX-512 path (no bitmask weights there)."""
    import pytest
    from sparse_runtime.kernels import native
    from sparse_runtime.kernels import prefill as P
    from sparse_runtime.models.tiny import tiny_model
    from sparse_runtime.runtime.lean_llama import PREFILL_BF16_MIN, LeanConfig, LeanLlama

    if native.select_isa() != "avx512":  # e.g. SPARSE_RUNTIME_KERNEL_ISA=avx2: csr16 / dense codes, no fused form
        pytest.skip("the lean engine packs bitmask weights (what the fused bf16 forms read) on the AVX-512 path only")
    model = random_pruned(tiny_model("llama"))
    opts = {"sparse": True, "calibrate": False}
    if dtype is not None:
        opts["value_dtype"] = dtype
    ids = torch.randint(0, 256, (1, PREFILL_BF16_MIN + 9), generator=torch.Generator().manual_seed(4))
    ref = LeanLlama(model, LeanConfig(**opts), threads=2).prefill(ids)
    monkeypatch.setattr(P, "choose_prefill_form", lambda *a, **k: form)
    bf = LeanLlama(model, LeanConfig(prefill_dtype="bfloat16", **opts), threads=2)
    got = bf.prefill(ids)
    lin = [f for l in bf.layers for f in (l.qkv, l.o, l.gate_up, l.down)]
    assert sum(f.prefill_forms.get(form, 0) for f in lin) == len(lin)
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= 0.02 * scale
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    # a prompt fed to a serving slot in two chunks (the second attends to the first through the mask,
    # not the built-in causal one): the same last-token logits as the whole prompt at once
    bf.init_slots(2, 64)
    half = ids.shape[1] // 2 + 1
    bf.prefill_slot(1, ids[0, :half])
    chunked = bf.prefill_slot(1, ids[0, half:])
    assert float((chunked - got[0, -1]).abs().max()) <= 0.02 * scale
    return model, opts, ids, got
