"""Two processes (torchrun, gloo, CPU) fine-tune a tiny sparse model and merge it; the result
matches a one-process run with the same global batch."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import sparse_runtime as sr
from sparse_runtime.sparsity import topk_prune_mask

pytestmark = pytest.mark.distributed


def _base(path):
    lm = sr.load_model("tiny-llama")
    with torch.no_grad():
        for _, lin in lm.family.iter_linears(lm.model):
            lin.weight.mul_(topk_prune_mask(lin.weight.abs(), 0.5, per_row=True))
    sr.save_checkpoint(lm.model, lm.tokenizer, path, sr.build_manifest(lm.model, lm.family, base_model="tiny-llama"))
    return path


def test_two_process_gloo_trains_and_merges(tmp_path):
    if shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")):
        pytest.skip("torchrun not available")
    base = _base(tmp_path / "base")
    args = ["finetune", str(base), "--method", "lors", "--data", "c4", "--steps", "3", "--batch-size", "4",
            "--micro-batch-size", "1", "--seq-len", "32", "--rank", "2", "--init-samples", "4", "--lr", "1e-3",
            "--out"]
    env = dict(os.environ, OMP_NUM_THREADS="1", SPARSE_RUNTIME_QUIET="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sparse_runtime.cli", *args, str(tmp_path / "ddp"), "--merge-to", str(tmp_path / "merged"),
           "--reprune", "mask"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ddp = json.loads((tmp_path / "ddp" / "finetune.json").read_text())
    assert ddp["steps"] == 3
    merged = sr.load_model(tmp_path / "merged")  # manifest verified on load
    assert merged.manifest.history[-1]["stage"] == "merge"
    # one process with the same global batch gives the same loss curve
    from sparse_runtime.cli import main

    assert main([*args, str(tmp_path / "single")]) == 0
    single = json.loads((tmp_path / "single" / "finetune.json").read_text())
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-4)
