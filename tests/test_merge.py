"""Merge exactness on tiny models of each family: sparsity, mask digest, N:M pattern and logits
against the adapter model; dense LoRA's re-prune keeps the counts; foreign adapters refused."""
import pytest
import torch
from torch import nn

import sparse_runtime as sr
from sparse_runtime.adapters import DenseLoRAConfig, LoRSConfig, MaskedLoRAConfig, attach_adapters, iter_adapters
from sparse_runtime.errors import ManifestError
from sparse_runtime.merge import _fix_kept_zeros, merge_adapters
from sparse_runtime.sparsity import NMPattern, mask_digest, nm_compliant
from helpers import tiny_pruned


def pruned(family, structure):
    return tiny_pruned(family, structure)


def perturb(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, ad in iter_adapters(model):
            ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.05)


CONFIGS = {"lors": LoRSConfig(rank=4), "masked-lora": MaskedLoRAConfig(rank=4)}


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", ["lors", "masked-lora"])
def test_merge_is_exact(family_name, structure, method):
    lm, man = pruned(family_name, structure)
    attach_adapters(lm.model, method, CONFIGS[method], lm.family)
    perturb(lm.model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = lm.model(ids).logits
    rep = merge_adapters(lm.model, lm.family, manifest=man)
    assert not list(iter_adapters(lm.model))
    for n, lin in lm.family.iter_linears(lm.model):
        assert isinstance(lin, nn.Linear)
        assert mask_digest(lin.weight != 0) == man.layers[n].mask_sha256
        assert int((lin.weight != 0).sum()) == man.layers[n].nnz
        if structure == "2:4":
            assert nm_compliant(lin.weight, NMPattern(2, 4))
    with torch.no_grad():
        after = lm.model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert rep.kept_zero_fixups == 0 and rep.reprune is None
    sr.verify_manifest(lm.model, sr.build_manifest(lm.model, lm.family, previous=man))
    # the update did land in the weights
    lm2, _ = pruned(family_name, structure)
    assert any(not torch.equal(a.weight, b.weight) for (_, a), (_, b) in
               zip(lm.family.iter_linears(lm.model), lm2.family.iter_linears(lm2.model)))


@pytest.mark.parametrize("how", ["magnitude", "wanda", "mask"])
@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_dense_lora_reprune_keeps_counts(structure, how):
    lm, man = pruned("llama", structure)
    attach_adapters(lm.model, "dense-lora", DenseLoRAConfig(rank=4), lm.family)
    perturb(lm.model)
    base_rows = {n: (lin.weight != 0).sum(1) for n, lin in lm.family.iter_linears(lm.model)}
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    rep = merge_adapters(lm.model, lm.family, manifest=man, reprune=how, calib_ids=calib)
    assert rep.reprune == how
    for n, lin in lm.family.iter_linears(lm.model):
        assert torch.equal((lin.weight != 0).sum(1), base_rows[n])
        if structure == "2:4":
            assert nm_compliant(lin.weight, NMPattern(2, 4))
        if how == "mask":
            assert mask_digest(lin.weight != 0) == man.layers[n].mask_sha256
    if how == "magnitude":
        assert rep.mask_changed > 0  # the dense update moved weights across the threshold


def test_bf16_cast_never_zeroes_a_kept_weight():
    w32 = torch.tensor([[1e-42, -1e-41, 0.5, 0.0]])
    keep = torch.tensor([[True, True, True, False]])
    w = w32.to(torch.bfloat16)
    w[0, :2] = 0  # what a cancellation rounding to zero looks like
    assert _fix_kept_zeros(w, w32, keep) == 2
    assert torch.equal(w != 0, keep) and w[0, 1] < 0


def test_merge_dir_refuses_foreign_base(tmp_path):
    from sparse_runtime.training import TrainConfig, finetune
    from sparse_runtime.merge import merge_adapter_dir

    lm, man = pruned("mistral", "unstructured")
    sr.save_checkpoint(lm.model, lm.tokenizer, tmp_path / "base", man)
    finetune(tmp_path / "base", tmp_path / "ad", TrainConfig(method="masked-lora", data="c4", steps=1, batch_size=2,
                                                           seq_len=32), {"rank": 2})
    lm2, man2 = pruned("mistral", "2:4")
    sr.save_checkpoint(lm2.model, lm2.tokenizer, tmp_path / "other", man2)
    with pytest.raises(ManifestError, match="other sparsity masks"):
        merge_adapter_dir(tmp_path / "ad", tmp_path / "m", base=str(tmp_path / "other"))
    out, rep = merge_adapter_dir(tmp_path / "ad", tmp_path / "m")
    loaded = sr.load_model(out)  # verifies the manifest against the weights
    assert loaded.manifest.total_measured == pytest.approx(man.total_measured)
    assert rep.max_abs_logit_diff < 1e-3
