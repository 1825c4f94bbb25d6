"""Adapters: LoRS's custom backward against autograd references (float64 gradcheck), equivalence
with masked LoRA, memory kept for backward, initialisation, rank handling, bad input."""
import math

import pytest
import torch
from torch import nn

import sparse_runtime as sr
from sparse_runtime.adapters import (FINETUNE_METHODS, DenseLoRA, LoRSAdapter, LoRSConfig, LoRSFunction, MaskedLoRA,
                                     MaskedLoRAConfig, DenseLoRAConfig, attach_adapters, count_trainable,
                                     iter_adapters)
from sparse_runtime.errors import ConfigError
from sparse_runtime.sparsity import nm_prune_mask, NMPattern


def sparse_linear(out_f=10, in_f=12, dtype=torch.float64, seed=0, nm=False):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f).to(dtype).requires_grad_(False)
    with torch.no_grad():
        if nm:
            lin.weight.mul_(nm_prune_mask(lin.weight.abs(), NMPattern(2, 4)))
        else:
            lin.weight[torch.rand_like(lin.weight) < 0.5] = 0
    return lin


def rand_pair(r, out_f, in_f, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, in_f, generator=g, dtype=dtype).requires_grad_()
    B = torch.randn(out_f, r, generator=g, dtype=dtype).requires_grad_()
    return A, B


@pytest.mark.parametrize("stored_mask", [False, True])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_lors_exact_backward_gradcheck(stored_mask, chunk):
    lin = sparse_linear()
    A, B = rand_pair(3, 10, 12)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    mask = (lin.weight != 0) if stored_mask else None
    f = lambda x, A, B: LoRSFunction.apply(x, lin.weight, lin.bias, A, B, 0.7, mask, "exact", chunk, torch.float64)
    assert torch.autograd.gradcheck(f, (x, A, B))


def _masked_reference(x, W, b, A, B, s, masked=True):
    M = (W != 0).to(W.dtype)
    return torch.nn.functional.linear(x, W + s * (B @ A) * (M if masked else 1), b)


def test_lors_exact_matches_autograd_of_masked_forward():
    lin = sparse_linear()
    A, B = rand_pair(3, 10, 12)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    y = LoRSFunction.apply(x, lin.weight, lin.bias, A, B, 0.7, None, "exact", 4, torch.float64)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, A, B), g)
    y_ref = _masked_reference(x, lin.weight, lin.bias, A, B, 0.7)
    ref = torch.autograd.grad(y_ref, (x, A, B), g)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode,factor", [("straight-through", 0.7), ("official", 1.0)])
def test_lors_straight_through_modes_match_unmasked_lora_gradient(mode, factor):
    """Straight-through: adapter grads are the unmasked LoRA gradient (``official``: without s);
    grad_x is still the masked forward's."""
    lin = sparse_linear()
    A, B = rand_pair(3, 10, 12)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    y = LoRSFunction.apply(x, lin.weight, lin.bias, A, B, 0.7, None, mode, 4, torch.float64)
    g = torch.randn_like(y)
    gx, gA, gB = torch.autograd.grad(y, (x, A, B), g)
    # reference for the adapter: autograd of the UNMASKED LoRA forward, scale `factor`
    y_un = _masked_reference(x, lin.weight, lin.bias, A, B, factor, masked=False)
    _, rA, rB = torch.autograd.grad(y_un, (x, A, B), g)
    torch.testing.assert_close(gA, rA)
    torch.testing.assert_close(gB, rB)
    # reference for the input: autograd of the masked forward (gradcheck-able on x alone)
    rx = torch.autograd.grad(_masked_reference(x, lin.weight, lin.bias, A, B, 0.7), x, g)[0]
    torch.testing.assert_close(gx, rx)
    f = lambda x: LoRSFunction.apply(x, lin.weight, lin.bias, A.detach(), B.detach(), 0.7, None, mode, 4,
                                     torch.float64)
    assert torch.autograd.gradcheck(f, (x,))


def test_lors_equals_masked_lora_adapter_and_nm_kept():
    lin = sparse_linear(16, 16, torch.float32, nm=True)
    lin2 = nn.Linear(16, 16)
    lin2.load_state_dict(lin.state_dict())
    a = LoRSAdapter(lin, LoRSConfig(rank=4, alpha=4.0), "l")
    m = MaskedLoRA(lin2, MaskedLoRAConfig(rank=4, alpha=4.0, scaling="rslora"), "l")
    with torch.no_grad():
        nn.init.normal_(a.lora_B)
        m.lora_A.copy_(a.lora_A)
        m.lora_B.copy_(a.lora_B)
    x = torch.randn(3, 7, 16)
    ya, ym = a(x), m(x)
    torch.testing.assert_close(ya, ym)
    g = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, (a.lora_A, a.lora_B), g)
    gm = torch.autograd.grad(ym, (m.lora_A, m.lora_B), g)
    for u, v in zip(ga, gm):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
    w = a.merged_weight()
    assert torch.equal(w != 0, lin.weight != 0)


def _saved_bytes(fn, resident=()):
    """Bytes of the tensors autograd keeps for backward, beyond ``resident`` ones (weights, input)."""
    skip = {t.untyped_storage().data_ptr() for t in resident}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_lors_saves_no_out_by_in_tensor():
    out_f, in_f = 256, 192
    lin = sparse_linear(out_f, in_f, torch.float32)
    lin2 = nn.Linear(in_f, out_f)
    lin2.load_state_dict(lin.state_dict())
    a = LoRSAdapter(lin, LoRSConfig(rank=4, init="kaiming"), "l")
    m = MaskedLoRA(lin2, MaskedLoRAConfig(rank=4, mask_source="weights"), "l")
    x = torch.randn(4, in_f, requires_grad=True)  # inside a model, inputs carry gradients
    _, lors_bytes = _saved_bytes(lambda: a(x), [x, lin.weight, lin.bias, a.lora_A, a.lora_B])
    _, masked_bytes = _saved_bytes(lambda: m(x), [x, lin2.weight, lin2.bias, m.lora_A, m.lora_B])
    # LoRS keeps nothing new (x, W, A, B are resident); masked LoRA keeps W~ (out x in, fp32) and the mask
    assert lors_bytes == 0
    assert masked_bytes >= out_f * in_f * (4 + 1)


def test_lors_refuses_weight_gradient():
    lin = sparse_linear(dtype=torch.float32)
    lin.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen base weight"):
        LoRSFunction.apply(torch.randn(2, 12), lin.weight, None, torch.zeros(2, 12), torch.zeros(10, 2), 1.0, None,
                           "exact", 4, torch.float32)


def test_gradient_svd_init_top_right_singular_vectors():
    lin = sparse_linear(20, 16, torch.float32)
    a = LoRSAdapter(lin, LoRSConfig(rank=3), "l")
    torch.manual_seed(0)
    U, S, V = torch.linalg.svd(torch.randn(20, 16), full_matrices=False)
    S = torch.tensor([10.0, 8.0, 6.0] + [0.1] * 13)
    G = U @ torch.diag(S) @ V
    a.init_from_gradient(G)
    assert torch.count_nonzero(a.lora_B) == 0
    # A's rows span the top-3 right singular subspace of G
    P = V[:3].t() @ V[:3]
    torch.testing.assert_close(a.lora_A @ P, a.lora_A, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.lora_A @ a.lora_A.t(), torch.eye(3), atol=1e-4, rtol=1e-4)


def test_scales_and_defaults():
    assert LoRSConfig(rank=16).scale_for(16) == pytest.approx(16 / math.sqrt(16))  # official c = alpha/sqrt(r)
    assert MaskedLoRAConfig(rank=8).scale_for(8) == pytest.approx(2.0)  # alpha 16 / r 8
    assert set(FINETUNE_METHODS.names()) >= {"lors", "masked-lora", "dense-lora"}
    with pytest.raises(ConfigError, match="unknown fine-tuning method"):
        FINETUNE_METHODS.get("qlora")
    with pytest.raises(ConfigError, match="grad_mode"):
        LoRSConfig(grad_mode="approx").validate()


def test_rank_larger_than_layer_is_a_clear_error():
    model = sr.tiny_model("llama")
    with pytest.raises(ConfigError, match="rank 200 is larger than layer"):
        attach_adapters(model, "masked-lora", MaskedLoRAConfig(rank=200))
    assert not list(iter_adapters(model))  # nothing was changed


def test_attach_counts_and_set_rank_keeps_output():
    model = sr.tiny_model("qwen2")
    ads = attach_adapters(model, "dense-lora", DenseLoRAConfig(rank=4, ranks={"model.layers.0.mlp.down_proj": 2}))
    assert len(ads) == 14
    expected = sum(a.rank * (a.in_features + a.out_features) for a in ads.values())
    assert count_trainable(model) == expected
    assert ads["model.layers.0.mlp.down_proj"].rank == 2
    ad = ads["model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        nn.init.normal_(ad.lora_B)
    x = torch.randn(2, 5, 64)
    y0 = ad(x)
    ad.set_rank(6)
    torch.testing.assert_close(ad(x), y0, rtol=1e-5, atol=1e-6)
    assert ad.rank == 6


def test_lors_bf16_autocast_close_to_fp32():
    lin = sparse_linear(32, 32, torch.float32)
    a = LoRSAdapter(lin, LoRSConfig(rank=4), "l")
    with torch.no_grad():
        nn.init.normal_(a.lora_B, std=0.02)
    x = torch.randn(2, 6, 32)
    y32 = a(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = a(x)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)
    y16.float().sum().backward()
    assert a.lora_A.grad is not None and a.lora_A.grad.dtype == torch.float32
