"""The lean engines' slot interface (continuous batching): chunked ``prefill_slot`` and batched
``decode_slots`` of sequences of different lengths give the logits of the single-sequence forward,
for each family (Mistral with a sliding window shorter than the sequences), sparse and dense."""
import os

import pytest
import torch

from sparse_runtime.kernels import available, unavailable_reason
from sparse_runtime.models.tiny import tiny_model

if not available():
    if os.environ.get("SPARSE_RUNTIME_REQUIRE_KERNELS") == "1":
        raise RuntimeError(unavailable_reason())
    pytest.skip(unavailable_reason() or "sparse kernels unavailable", allow_module_level=True)

from sparse_runtime.runtime.lean_llama import LeanConfig, LeanLlama  # noqa: E402

ATOL = 2e-5


def _model(family, sparse):
    m = tiny_model(family, sliding_window=8) if family == "mistral" else tiny_model(family)
    if sparse:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if p.dim() == 2 and "embed" not in n and "lm_head" not in n:
                    p.mul_((torch.rand(p.shape, generator=g) >= 0.7).float())
    return m


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_slots_equal_single_sequence(family_name, sparse):
    lean = LeanLlama(_model(family_name, sparse), LeanConfig(sparse=sparse, calibrate=False), threads=1)
    lean.init_slots(6, 48)
    g = torch.Generator().manual_seed(0)
    slots = [0, 2, 3, 5]  # a gap: idle slots inside the batched attention range
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (5, 11, 3, 17)]
    steps = 10
    toks = torch.randint(0, 256, (steps, len(slots)), generator=g)
    refs = []
    for j, p in enumerate(prompts):  # the single-sequence path, one sequence at a time
        first = lean.prefill(p.view(1, -1))[0, -1].clone()
        refs.append([first] + [lean.forward(toks[t, j].view(1, 1))[0, -1].clone() for t in range(steps)])
    for j, (p, s) in enumerate(zip(prompts, slots)):  # chunked prefill: 4 tokens, then the rest
        out = lean.prefill_slot(s, p[:4])
        if len(p) > 4:
            out = lean.prefill_slot(s, p[4:])
        torch.testing.assert_close(out, refs[j][0], atol=ATOL, rtol=0)
    for t in range(steps):
        sub = [1] if t % 3 == 0 else list(range(len(slots)))  # batch 1 (the C step) and batch 4
        out = lean.decode_slots([slots[j] for j in sub], [int(toks[t, j]) for j in sub])
        for r, j in enumerate(sub):
            torch.testing.assert_close(out[r], refs[j][t + 1], atol=ATOL, rtol=0)
        for j in set(range(len(slots))) - set(sub):  # the others one by one
            torch.testing.assert_close(lean.decode_slots([slots[j]], [int(toks[t, j])])[0], refs[j][t + 1],
                                       atol=ATOL, rtol=0)
    assert lean.slot_len == [5 + steps, 0, 11 + steps, 3 + steps, 0, 17 + steps]
    lean.free_slot(2)
    assert lean.slot_len[2] == 0
    with pytest.raises(Exception, match="capacity"):
        lean.prefill_slot(1, torch.zeros(49, dtype=torch.long))


def test_blocked_lm_head_equals_linear():
    from sparse_runtime.runtime.lean_llama import choose_lm_head_form, lm_head_blocked

    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(1000, 48, generator=g), torch.randn(1000, generator=g), torch.randn(5, 48, generator=g)
    torch.testing.assert_close(lm_head_blocked(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=0)
    assert set(choose_lm_head_form(w, None, 16, 1)) == {2, 4, 8, 16}
