"""The batched C decode step (``sr_decode_step_batch`` behind ``LeanLlama.decode_slots`` at B > 1)
against the two references it replaces: the batched torch path and B separate single-slot C steps.
Slots of different lengths, non-contiguous slot sets, every family (Mistral with a sliding window
shorter than the sequences, Qwen2 with q/k/v biases), dense and sparse (70 % unstructured and 2:4),
every ISA path and layout, one and two threads, the batch sizes that switch kernels (mask-expand
tiles, the transposed-x walk from 6 rows, the K-blocked walk from 64), and odd shapes (tails)."""
import os

import pytest
import torch

from sparse_runtime.kernels import available, supported_isas, unavailable_reason
from sparse_runtime.models.tiny import tiny_model

if not available():
    if os.environ.get("SPARSE_RUNTIME_REQUIRE_KERNELS") == "1":
        raise RuntimeError(unavailable_reason())
    pytest.skip(unavailable_reason() or "sparse kernels unavailable", allow_module_level=True)

from sparse_runtime.kernels import decode as cdec  # noqa: E402
from sparse_runtime.runtime.lean_llama import LeanConfig, LeanLlama  # noqa: E402

ATOL = 1e-4
ISAS = [pytest.param(i, marks=pytest.mark.skipif(i not in supported_isas(), reason=f"CPU lacks {i}"))
        for i in ("avx512", "avx2", "portable")]
pytestmark = pytest.mark.skipif(not cdec.batch_available(), reason="kernels predate sr_decode_step_batch")


def _prune(model, kind: str, seed: int = 1):
    """Zero the decoder linears: 'u70' (70 % unstructured, random) or '2:4' (two largest of every 4)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() != 2 or "embed" in n or "lm_head" in n:
                continue
            if kind == "u70":
                p.mul_((torch.rand(p.shape, generator=g) >= 0.7).float())
            else:
                grp = p.view(p.shape[0], -1, 4)
                keep = grp.abs().topk(2, dim=-1).indices
                grp.mul_(torch.zeros_like(grp).scatter_(-1, keep, 1.0))
    return model


def _leans(model, sparse: bool, threads: int, isa=None, layout=None, n_slots=8, cap=48, kv_dtype="float32"):
    """Three engines on one model: batched C step, batched torch path, single-slot steps."""
    out = []
    for c_batch in (True, False, None):
        lean = LeanLlama(model, LeanConfig(sparse=sparse, calibrate=False, isa=isa, layout=layout, kv_dtype=kv_dtype),
                         threads=threads)
        lean.init_slots(n_slots, cap)
        lean.slot_batch_c = bool(c_batch)
        out.append(lean)
    return out


def _run(model, sparse, threads=1, isa=None, layout=None, slots=(1, 4, 5, 7, 2, 0, 6), lengths=(3, 9, 14, 6, 33, 1, 11),
         batches=((1, 4), (0, 1, 2, 3, 4, 5, 6), (4, 2, 0), (1, 4, 2, 5, 0)), steps=1, n_slots=8, cap=48,
         kv_dtype="float32"):
    """Prefill each slot (its own length), then decode steps over changing subsets of the slots (the
    batch positions refer to ``slots``); every batch's logits from the C step equal the torch batch
    and the single steps."""
    lc, lt, l1 = _leans(model, sparse, threads, isa, layout, n_slots, cap, kv_dtype)
    if sparse:
        assert any(f.module is not None for f in lc.linears())
    g = torch.Generator().manual_seed(0)
    for s, n in zip(slots, lengths):
        ids = torch.randint(0, 256, (n,), generator=g)
        for lean in (lc, lt, l1):
            lean.prefill_slot(s, ids)
    for _ in range(steps):
        for sub in batches:
            ss = [slots[j] for j in sub]
            toks = torch.randint(0, 256, (len(ss),), generator=g).tolist()
            before = lc.c_steps
            out_c = lc.decode_slots(ss, toks)
            assert lc.c_steps == before + 1  # one C call for the whole batch
            out_t = lt.decode_slots(ss, toks)
            out_1 = torch.stack([l1.decode_slots([s], [t])[0] for s, t in zip(ss, toks)])
            assert out_c.shape == (len(ss), lc.vocab)
            torch.testing.assert_close(out_c, out_t, atol=ATOL, rtol=0)
            torch.testing.assert_close(out_c, out_1, atol=ATOL, rtol=0)
    assert lc.slot_len == lt.slot_len == l1.slot_len
    # the caches agree too (each K/V in its own slot's rows)
    torch.testing.assert_close(lc.slot_k, l1.slot_k, atol=ATOL, rtol=0)
    torch.testing.assert_close(lc.slot_v, l1.slot_v, atol=ATOL, rtol=0)
    return lc


@pytest.mark.parametrize("prune", [None, "u70", "2:4"], ids=["dense", "u70", "2of4"])
def test_batch_step_equals_torch_and_single_steps(family_name, prune):
    m = tiny_model(family_name, sliding_window=8) if family_name == "mistral" else tiny_model(family_name)
    _run(_prune(m, prune) if prune else m, sparse=prune is not None, steps=2)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
def test_every_isa_and_thread_count(isa, threads):
    m = _prune(tiny_model("qwen2"), "u70")
    _run(m, sparse=True, threads=threads, isa=isa)
    _run(m, sparse=False, threads=threads, isa=isa)


@pytest.mark.parametrize("layout", ["bitmask", "csr16"])
def test_avx2_both_layouts(layout):
    if "avx2" not in supported_isas():
        pytest.skip("CPU lacks avx2")
    lc = _run(_prune(tiny_model("llama"), "u70"), sparse=True, isa="avx2", layout=layout)
    assert {f.module.packed.layout for f in lc.linears() if f.module is not None} == {layout}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [2, 3, 5])
def test_attention_shares_across_rows(isa, threads):
    """The batched step's attention in equal shares of all rows' (kv head, position) pairs: rows of 1
    to 90 positions, so a share holds the end of one row's heads and the start of the next row's, a
    long head is cut between up to 5 shares (its first and last pieces the threads' partial slots),
    whole heads sit between cut ones; 1 and 3 kv heads, a sliding window (pieces over the window
    only), and an fp16 cache."""
    for kvh, heads in ((1, 2), (3, 6)):
        m = _prune(tiny_model("llama", hidden_size=16 * heads, num_attention_heads=heads, num_key_value_heads=kvh),
                   "u70")
        _run(m, sparse=True, threads=threads, isa=isa, lengths=(1, 40, 2, 90, 5, 1, 17), cap=128, steps=2)
    m = _prune(tiny_model("mistral", sliding_window=24), "u70")
    _run(m, sparse=True, threads=threads, isa=isa, lengths=(1, 40, 2, 90, 5, 1, 17), cap=128, kv_dtype="float16")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
def test_fp16_kv_cache(isa, threads):
    """kv_dtype float16: the serving cache holds fp16; the batched C step, the torch batch and the
    single steps store the same rounded K/V and agree (a sliding window included)."""
    m = _prune(tiny_model("mistral", sliding_window=8), "u70")
    lc = _run(m, sparse=True, threads=threads, isa=isa, kv_dtype="float16")
    assert lc.slot_k.dtype == lc.slot_v.dtype == torch.float16


@pytest.mark.parametrize("isa", ISAS)
def test_odd_shapes(isa):
    """hidden 36, intermediate 60, head_dim 18: the vector tails of every kernel and of attention."""
    m = tiny_model("mistral", sliding_window=8, hidden_size=36, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=60)
    _run(_prune(m, "2:4"), sparse=True, isa=isa)
    _run(m, sparse=False, isa=isa)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_large_batch_uses_the_blocked_kernels(sparse):
    """66 slots in one step: the AVX-512 K-blocked walk (from 64 rows) and many 4-row tiles."""
    m = _prune(tiny_model("llama"), "u70") if sparse else tiny_model("llama")
    n = 66
    lengths = [1 + (7 * i) % 13 for i in range(n)]
    _run(m, sparse=sparse, slots=tuple(range(n)), lengths=tuple(lengths), batches=(tuple(range(n)),),
         n_slots=n, cap=24)


def test_bad_arguments_name_the_problem():
    lc, _, _ = _leans(tiny_model("llama"), False, 1)
    step = lc._slot_batch_step()
    out = torch.empty(2, lc.vocab)
    with pytest.raises(Exception, match="distinct"):
        step([1, 2], [3, 3], [0, 0], out, 1)
    with pytest.raises(Exception, match="capacity"):
        step([1, 2], [3, 4], [0, 48], out, 1)
