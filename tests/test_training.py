"""The training engine: schedules, data (response-only loss), exact resume, accumulation,
bad input (no manifest, data that tokenises to nothing, foreign checkpoints), and the CLI."""
import json
import shutil

import pytest
import torch

import sparse_runtime as sr
from sparse_runtime.errors import CheckpointExistsError, ConfigError, DataNotFoundError, ManifestError
from sparse_runtime.training import TrainConfig, alpaca_examples, finetune, lr_factor
from sparse_runtime.training.data import IGNORE
from helpers import save_tiny_pruned


def pruned_checkpoint(path, family="llama", sparsity=0.5, manifest=True):
    return save_tiny_pruned(path, family, sparsity=sparsity, with_targets=True, manifest=manifest)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return pruned_checkpoint(tmp_path_factory.mktemp("ft") / "base")


def c4cfg(**kw):
    d = dict(method="lors", data="c4", steps=6, batch_size=4, micro_batch_size=2, seq_len=32, lr=1e-3,
             schedule="cosine", save_every=3)
    d.update(kw)
    return TrainConfig(**d)


LORS = {"rank": 4, "init_samples": 4}


def test_lr_schedules():
    assert lr_factor(0, 10, 2, "linear", 0.0) == pytest.approx(0.5)  # warmup
    assert lr_factor(2, 10, 2, "linear", 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 10, 2, "linear", 0.0) == pytest.approx(0.0)
    assert lr_factor(6, 10, 2, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(10, 10, 0, "cosine", 0.1) == pytest.approx(0.1)  # floor (LoRS: 1e-6 of 2e-5)
    assert lr_factor(5, 10, 0, "constant", 0.0) == 1.0


def test_alpaca_loss_on_response_only():
    tok = sr.models.ByteTokenizer()
    rec = {"instruction": "Say hi", "input": "", "output": "hi"}
    (ex,) = alpaca_examples(tok, [rec], 512)
    prompt = sr.data.alpaca_prompt(rec)
    n = len(prompt.encode())
    assert ex.labels[:n] == [IGNORE] * n
    assert ex.labels[n:] == list(b"hi") + [tok.eos_token_id]
    assert ex.input_ids[n:] == list(b"hi") + [tok.eos_token_id]
    assert ex.target_tokens == 3
    assert alpaca_examples(tok, [rec], n) == []  # response truncated away: dropped


def test_data_that_tokenises_to_nothing(tmp_path, base):
    bad = tmp_path / "empty.json"
    bad.write_text(json.dumps([{"instruction": "x", "input": "", "output": ""}] * 3))
    with pytest.raises(DataNotFoundError, match="tokenises to nothing"):
        finetune(base, tmp_path / "o1", TrainConfig(data="alpaca", data_path=str(bad), steps=1, seq_len=64), LORS)
    txt = tmp_path / "t.txt"
    txt.write_text("   ")
    with pytest.raises(DataNotFoundError, match="tokenises to nothing"):
        finetune(base, tmp_path / "o2", TrainConfig(data="text", data_path=str(txt), steps=1, seq_len=64), LORS)


def test_resume_reproduces_loss_curve_exactly(tmp_path, base):
    full, _ = finetune(base, tmp_path / "full", c4cfg(), LORS)
    assert len(full.losses) == 6 and full.losses[-1] < full.losses[0]
    # a second run dies after step 3 (simulated: copy the run as it was at step 3), then resumes
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "step-000006")
    resumed, _ = finetune(base, part, c4cfg(), LORS, resume=True)
    assert resumed.resumed_from.endswith("step-000003")
    assert resumed.losses == full.losses  # bit-for-bit
    a = (tmp_path / "full" / "adapter_model.safetensors").read_bytes()
    assert (part / "adapter_model.safetensors").read_bytes() == a
    steps = [json.loads(l)["step"] for l in (part / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_from_foreign_checkpoint_is_refused(tmp_path, base):
    finetune(base, tmp_path / "a", c4cfg(steps=3), LORS)
    ck = tmp_path / "a" / "checkpoints" / "step-000003"
    with pytest.raises(ManifestError, match="foreign checkpoint"):
        finetune(base, tmp_path / "b", c4cfg(steps=3, method="masked-lora"), {"rank": 4}, resume=str(ck))
    other = pruned_checkpoint(tmp_path / "other", sparsity=0.6)
    with pytest.raises(ManifestError, match="base_mask_fingerprint"):
        finetune(other, tmp_path / "c", c4cfg(steps=3), LORS, resume=str(ck))
    # killed before its first checkpoint: --resume starts afresh (with a note) instead of refusing
    fresh, _ = finetune(base, tmp_path / "d", c4cfg(steps=3), LORS, resume=True)
    assert fresh.resumed_from is None and fresh.steps == 3
    with pytest.raises(CheckpointExistsError):
        finetune(base, tmp_path / "a", c4cfg(steps=3), LORS)


def test_gradient_accumulation_matches_one_batch(tmp_path, base):
    one, _ = finetune(base, tmp_path / "one", c4cfg(steps=2, micro_batch_size=4, method="masked-lora"), {"rank": 4})
    acc, _ = finetune(base, tmp_path / "acc", c4cfg(steps=2, micro_batch_size=1, method="masked-lora"), {"rank": 4})
    assert one.losses == pytest.approx(acc.losses, rel=1e-5)


def test_no_manifest_warns_and_infers_masks(tmp_path):
    bare = pruned_checkpoint(tmp_path / "bare", manifest=False)
    with pytest.warns(UserWarning, match="no sparsity manifest"):
        res, lm = finetune(bare, tmp_path / "o", c4cfg(steps=1, save_every=0, method="masked-lora"), {"rank": 2})
    assert res.steps == 1


def test_eval_and_checkpointing_options(tmp_path, base, data_dir):
    cfg = c4cfg(steps=2, save_every=0, eval_every=1, eval_examples=2, eval_ppl=True, ppl_protocol="test",
                gradient_checkpointing=True, loss_chunk_tokens=16, method="dense-lora")
    res, _ = finetune(base, tmp_path / "o", cfg, {"rank": 2}, data_dir=data_dir)
    assert [e["step"] for e in res.evals] == [1, 2]
    assert all("eval_loss" in e and e["ppl"] > 1 for e in res.evals)
    meta = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert meta["method"] == "dense-lora" and meta["trainable_parameters"] == res.trainable_parameters


def test_chunked_loss_equals_full_loss(base):
    from sparse_runtime.training.loss import CausalLMLoss

    lm = sr.load_model(base)
    ids = torch.randint(0, 256, (2, 24))
    labels = ids.clone()
    labels[0, :5] = IGNORE
    a, n1 = CausalLMLoss(lm.model, 0)(ids, labels)
    b, n2 = CausalLMLoss(lm.model, 7)(ids, labels)
    assert int(n1) == int(n2) == 2 * 23 - 4
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_cli_finetune_then_merge(tmp_path, base):
    from sparse_runtime.cli import main

    out = tmp_path / "ad"
    rc = main(["finetune", str(base), "--method", "lors", "--data", "c4", "--steps", "2", "--batch-size", "2",
               "--seq-len", "32", "--rank", "2", "--init-samples", "2", "--out", str(out)])
    assert rc == 0 and (out / "adapter_model.safetensors").is_file()
    rc = main(["merge", str(out), "--out", str(tmp_path / "merged")])
    assert rc == 0
    m = sr.read_manifest(tmp_path / "merged")
    assert m.history[-1]["stage"] == "merge" and m.history[-1]["method"] == "lors"
    assert main(["finetune", str(base), "--data", "c4", "--steps", "1", "--rank", "999", "--out",
                 str(tmp_path / "x")]) == 2  # rank larger than a layer: one clear line, exit 2


def test_lors_init_micro_batch_same_average(tmp_path, base, data_dir):
    """The gradient-SVD init's micro-batch (a memory knob) does not change the averaged gradient, so
    the initial adapters agree up to float summation order."""
    from sparse_runtime.adapters import adapter_state_dict

    cfg = c4cfg(steps=1, lr=1e-12)  # the adapters stay at their initialisation
    _, lm_a = finetune(base, tmp_path / "a", cfg, {**LORS, "init_samples": 4}, data_dir=data_dir)
    _, lm_b = finetune(base, tmp_path / "b", cfg, {**LORS, "init_samples": 4, "init_micro_batch": 1},
                       data_dir=data_dir)
    sa, sb = adapter_state_dict(lm_a.model), adapter_state_dict(lm_b.model)
    assert sa.keys() == sb.keys() and any(k.endswith("lora_A") for k in sa)
    for k in sa:
        if k.endswith("lora_A"):  # singular vectors: equal up to sign per row
            A, B = sa[k], sb[k]
            sign = torch.sign((A * B).sum(1, keepdim=True))
            torch.testing.assert_close(A, B * sign, atol=1e-4, rtol=1e-3)
    with pytest.raises(ConfigError, match="init_micro_batch"):
        finetune(base, tmp_path / "c", cfg, {**LORS, "init_micro_batch": -1}, data_dir=data_dir)
