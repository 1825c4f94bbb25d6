"""Pieces shared by the benchmarks: pruned bases, per-process memory measurement, fresh-subprocess
workers (the fine-tuning benchmarks) and the K/V bytes a decode step reads (the latency benchmarks).

Peak memory is only comparable between methods when each runs in its own process (the allocator
never returns all freed memory), so every method is trained in a fresh worker that reports one JSON
line on stdout. Scripts import this as ``from _common import ...`` (Python puts the script's folder
on ``sys.path``)."""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from sparse_runtime.runtime.base import peak_rss_mb, rss_mb

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def tf32_training(enabled: bool):
    """TF32 tensor-core matmuls inside the block when ``enabled`` (PyTorch's default is full fp32);
    the previous setting comes back after it, so evaluation outside the block stays full fp32."""
    if not enabled:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def wanda_base(work: Path, sparsity: float = 0.5, model: str = "smollm2-135m") -> Path:
    """``model`` pruned with Wanda at ``sparsity`` under ``quick`` calibration, cached in ``work``."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(str(model)).name)
    out = Path(work) / f"{name}-wanda{int(round(sparsity * 100))}"
    if (out / "sparsity_manifest.json").is_file():
        return out
    from sparse_runtime.prune import PruneConfig, prune_checkpoint

    prune_checkpoint(model, PruneConfig(method="wanda", sparsity=sparsity, protocol="quick"), out, overwrite=True)
    return out


def saved_for_backward_mb(model: torch.nn.Module, loss_fn, batch: dict) -> float:
    """MiB of the tensors autograd keeps for backward in one forward of ``loss_fn`` on ``batch``,
    parameters and buffers excluded (they are resident anyway). RSS also holds allocator slack; this
    isolates what the method itself asks autograd to keep."""
    resident = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        p = t.untyped_storage().data_ptr()
        if p not in resident:
            seen[p] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = loss_fn(batch["input_ids"], batch["labels"], batch["attention_mask"])
    del loss
    return sum(seen.values()) / 2**20


def train_and_measure(trainer, model: torch.nn.Module, out: Path) -> tuple[Any, dict]:
    """Train with ``trainer`` (already built, adapters attached) and measure: RSS before training,
    peak RSS, step times after the first (warm-up) step, and the saved-for-backward bytes of one
    forward on the first micro-batch."""
    base = rss_mb()
    res = trainer.train()
    peak = peak_rss_mb()
    log = [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]
    times = [r["step_s"] for r in log if "step_s" in r][1:]
    batch = trainer.rank_micro_batches(trainer.step_examples(0))[0]
    saved = saved_for_backward_mb(model, trainer.loss_module, batch)
    return res, {"rss_after_load_mb": base, "peak_rss_mb": peak, "train_peak_delta_mb": peak - base,
                 "saved_for_backward_mb": saved, "step_s_median": statistics.median(times) if times else None,
                 "step_s_all": times, "losses": res.losses}


def run_worker(script: str, args: Sequence[str]) -> dict:
    """Run ``script`` with ``args`` in a fresh Python process; return the JSON of its last stdout line."""
    cmd = [sys.executable, script, *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, SPARSE_RUNTIME_QUIET="1"), cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"worker {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def kv_bytes_per_token(cfg, context: int, steps: int, element_bytes: int = 4) -> float:
    """Bytes of K and V (``element_bytes`` each: 4 fp32, 2 fp16) a decode step reads, averaged over the
    timed steps: step i (0-based) after a ``context``-token prompt attends to context + i + 1 positions
    (every earlier one and itself; no sliding window), so the mean is context + (steps + 1) / 2, each
    position once per layer and kv head. ``cfg``: a transformers config or its ``config.json`` dict."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    heads = int(get("num_attention_heads"))
    d = int(get("head_dim", None) or int(get("hidden_size")) // heads)
    kvh = int(get("num_key_value_heads", None) or heads)
    positions = context + (steps + 1) / 2
    return int(get("num_hidden_layers")) * kvh * d * 2 * element_bytes * positions
