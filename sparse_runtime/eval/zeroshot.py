"""Zero-shot accuracy with lm-eval-harness's scoring (docs/protocols.md#zero-shot-accuracy,
docs/methods.md#zero-shot-suites).

For every choice the model scores the summed log-likelihood of the continuation given the context
(lm-eval's ``loglikelihood`` request); ``acc`` is the argmax of those sums and ``acc_norm`` the argmax
after dividing each by the length of the choice text in UTF-8 bytes (lm-eval divides by ``len(choice)``,
the choice without the leading space; the two agree on ASCII text). WinoGrande is scored the other
way round: the shared continuation under each partial context (:class:`~sparse_runtime.data.zeroshot.PartialItem`).
The pruning papers report ``acc``.

Tokenisation follows lm-eval's ``HFLM._encode_pair``: trailing spaces of the context move to the
front of the continuation, ``context + continuation`` is encoded as a whole (no special tokens, as
lm-eval does for causal LMs) and split at the length of the encoded context, so the continuation's
tokens are those the model would see in running text (a leading " yes" stays one token). The input
is ``(context + continuation)[-(max_length + 1):][:-1]`` and the last ``len(continuation)`` logits
score the continuation.

Speed: requests are deduplicated by input tokens (lm-eval's one-token-continuation cache: BoolQ's
" no"/" yes" share one forward), sorted longest first and run in right-padded batches; a causal
model's logits at real positions do not depend on pads to their right, and the attention mask hides
them anyway, so batched scores equal per-item scores up to float rounding.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..data.zeroshot import TASK_SETS, ZEROSHOT_TASKS, Item, resolve_tasks
from ..errors import ConfigError
from ..progress import progress

__all__ = ["ZEROSHOT_TASKS", "TASK_SETS", "ZeroShotResult", "evaluate_zeroshot", "encode_pair", "loglikelihoods",
           "score_items", "protocol_limit", "PROTOCOL_LIMITS"]

#: Items per task under each named protocol when no explicit limit is given (docs/protocols.md: the
#: ``quick`` variant uses a fixed prefix of each set and must say so; ``paper`` uses every item).
PROTOCOL_LIMITS: dict[str, Optional[int]] = {"quick": 500, "paper": None, "test": 8}


def protocol_limit(protocol: str) -> Optional[int]:
    if protocol not in PROTOCOL_LIMITS:
        raise ConfigError(f"unknown protocol {protocol!r} for zero-shot; choose one of {', '.join(PROTOCOL_LIMITS)}")
    return PROTOCOL_LIMITS[protocol]


# --------------------------------------------------------------------------------------------
# lm-eval's loglikelihood
# --------------------------------------------------------------------------------------------

def _encode(tokenizer, text: str, add_special_tokens: Optional[bool] = False) -> list[int]:
    if add_special_tokens is None:  # the tokenizer's own default (lm-eval >= 0.4.? with add_bos_token unset)
        return list(tokenizer.encode(text))
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _prefix_token(tokenizer) -> int:
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def encode_pair(tokenizer, context: str, continuation: str,
                add_special_tokens: Optional[bool] = False) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval's ``_encode_pair`` builds them.

    ``add_special_tokens=False`` is lm-eval v0.3's ``tok_encode`` (the harness the pruning papers
    used); ``None`` uses the tokenizer's default (lm-eval 0.4.13 with ``add_bos_token`` unset: a BOS
    for LLaMA tokenizers; nothing for SmolLM2, whose tokenizer adds none)."""
    if context == "":  # lm-eval: an empty context is the end-of-text token
        return [_prefix_token(tokenizer)], _encode(tokenizer, continuation, add_special_tokens)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation, add_special_tokens)
    ctx = _encode(tokenizer, context, add_special_tokens)
    return ctx, whole[len(ctx):]


def model_max_length(model, default: int = 2048) -> int:
    """lm-eval's ``HFLM.max_length``: the config's context size, else 2048."""
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 8,
                   max_length: Optional[int] = None, desc: str = "loglikelihood",
                   add_special_tokens: Optional[bool] = False) -> list[tuple[float, bool]]:
    """``[(sum log p(continuation | context), is_greedy), ...]`` for each (context, continuation).

    Batched, right-padded, longest first; identical inputs are run once (see the module docstring)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    max_length = max_length or model_max_length(model)
    conts: list[list[int]] = []
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tokenizer, context, continuation, add_special_tokens)
        if not cont:
            raise ConfigError(f"request {i}: the continuation {continuation!r} encodes to no tokens")
        whole = (ctx + cont)[-(max_length + 1):]
        conts.append(cont)
        groups.setdefault(tuple(whole[:-1]), []).append(i)
    inputs = sorted(groups, key=lambda t: (-len(t), t))
    out: list[tuple[float, bool]] = [(float("nan"), False)] * len(requests)
    dev = _device(model)
    pad = _prefix_token(tokenizer)
    batches = [inputs[s:s + batch_size] for s in range(0, len(inputs), batch_size)]
    for batch in progress(batches, desc=desc, total=len(batches), unit="batch"):
        width = len(batch[0])
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, inp in enumerate(batch):
            ids[b, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            mask[b, :len(inp)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
        for b, inp in enumerate(batch):
            n = len(inp)
            for i in groups[inp]:
                cont = conts[i]
                k = min(len(cont), n)
                lp = F.log_softmax(logits[b, n - k:n].float(), dim=-1)
                target = torch.tensor(cont[-k:], device=lp.device)
                ll = lp.gather(1, target[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == target).all())
                out[i] = (ll, greedy)
    return out


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def _argmax(values: Sequence[float]) -> int:
    """First index of the maximum (numpy.argmax's tie rule, which lm-eval uses)."""
    return max(range(len(values)), key=lambda j: (values[j], -j))


def _stderr(xs: Sequence[float]) -> float:
    """lm-eval's ``mean_stderr``: sample standard deviation / sqrt(n)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n)


NORM_UNITS = ("bytes", "chars")


def score_items(items: Sequence[Item], lls: Sequence[float], metrics: Sequence[str] = ("acc", "acc_norm"),
                norm_unit: str = "bytes") -> dict[str, float]:
    """acc / acc_norm of items given the flat list of per-request log-likelihoods (choice order).

    ``norm_unit="bytes"`` (docs/protocols.md; lm-eval calls this metric ``acc_bytes``) or ``"chars"``
    (lm-eval's ``acc_norm``: ``len(choice)``); identical on ASCII choices."""
    if norm_unit not in NORM_UNITS:
        raise ConfigError(f"norm_unit must be one of {NORM_UNITS}, got {norm_unit!r}")
    accs, norms, pos = [], [], 0
    for item in items:
        k = len(item.requests())
        v = list(lls[pos:pos + k])
        pos += k
        accs.append(float(_argmax(v) == item.gold))
        if "acc_norm" in metrics:
            lengths = [max(1, len(t.encode("utf-8")) if norm_unit == "bytes" else len(t)) for t in item.norm_texts()]
            norms.append(float(_argmax([x / n for x, n in zip(v, lengths)]) == item.gold))
    if pos != len(lls):
        raise ValueError(f"{len(lls)} log-likelihoods for {pos} requests")
    res = {"acc": sum(accs) / len(accs), "acc_stderr": _stderr(accs)}
    if "acc_norm" in metrics:
        res["acc_norm"] = sum(norms) / len(norms)
        res["acc_norm_stderr"] = _stderr(norms)
    return res


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------

@dataclass
class ZeroShotResult:
    """Per-task rows (task, n, limit, acc, acc_norm or None, stderrs, requests, seconds) and their mean acc."""

    rows: list[dict]
    task_set: str
    limit: Optional[int]
    seconds: float
    batch_size: int = 8
    norm_unit: str = "bytes"
    item_loglikelihoods: dict[str, list[float]] = field(default_factory=dict, repr=False)

    @property
    def mean_acc(self) -> float:
        return sum(r["acc"] for r in self.rows) / len(self.rows) if self.rows else float("nan")

    @property
    def mean_acc_norm(self) -> Optional[float]:
        """Mean of acc_norm where defined, else acc (a common convention; the papers report acc)."""
        vals = [r["acc_norm"] if r.get("acc_norm") is not None else r["acc"] for r in self.rows]
        return sum(vals) / len(vals) if vals else None

    def limit_note(self) -> str:
        return (f"first {self.limit} items per task (fixed prefix of each set, file order)" if self.limit
                else "all items of each set")

    def as_dict(self) -> dict:
        return {"task_set": self.task_set, "tasks": [r["task"] for r in self.rows], "limit": self.limit,
                "limit_note": self.limit_note(), "mean_acc": self.mean_acc, "rows": self.rows,
                "seconds": self.seconds, "batch_size": self.batch_size, "norm_unit": self.norm_unit,
                "scoring": "lm-eval-harness conventions: summed continuation log-likelihood; acc = argmax; "
                           f"acc_norm = argmax of loglik / choice length in {self.norm_unit}; WinoGrande partial "
                           "scoring; 0-shot"}

    def table_rows(self) -> list[dict]:
        cols = ("task", "n", "limit", "acc", "acc_stderr", "acc_norm", "seconds")
        rows = [{c: r.get(c) for c in cols} for r in self.rows]
        rows.append({"task": f"mean ({self.task_set})", "n": sum(r["n"] for r in self.rows), "limit": self.limit,
                     "acc": self.mean_acc})
        return rows

    def markdown(self) -> str:
        from ..report import markdown_table

        return markdown_table(self.table_rows())

    def save_json(self, path: os.PathLike) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.as_dict(), indent=1, default=str))
        return p


def evaluate_zeroshot(model, tokenizer, tasks: Union[None, str, Sequence[str]] = None, limit: Optional[int] = None,
                      batch_size: int = 8, data_dir: Optional[os.PathLike] = None,
                      max_length: Optional[int] = None, norm_unit: str = "bytes",
                      add_special_tokens: Optional[bool] = False) -> ZeroShotResult:
    """Zero-shot accuracy of ``model`` on ``tasks`` (None = all eight: Wanda's seven + PIQA; or "wanda",
    "atp", "all", "boolq,rte", or a list). ``limit``: the first N items of each task (None = all).

    ``norm_unit``: what ``acc_norm`` divides by (UTF-8 bytes by default; "chars" = lm-eval's
    ``len(choice)``). ``add_special_tokens``: see :func:`encode_pair`. All task files are loaded
    before the model runs, so missing data fails in a second."""
    if norm_unit not in NORM_UNITS:
        raise ConfigError(f"norm_unit must be one of {NORM_UNITS}, got {norm_unit!r}")
    set_label, names = resolve_tasks(tasks)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of items per task, got {limit}")
    loaded = {n: ZEROSHOT_TASKS.get(n).load(data_dir, limit) for n in names}
    was_training = getattr(model, "training", False)
    model.eval()
    rows, details = [], {}
    t_all = time.perf_counter()
    try:
        for name in names:
            task, items = ZEROSHOT_TASKS.get(name), loaded[name]
            reqs = [r for it in items for r in it.requests()]
            t0 = time.perf_counter()
            res = loglikelihoods(model, tokenizer, reqs, batch_size=batch_size, max_length=max_length,
                                 desc=f"{name} ({len(items)} items)", add_special_tokens=add_special_tokens)
            lls = [ll for ll, _ in res]
            m = score_items(items, lls, task.metrics, norm_unit)
            rows.append({"task": name, "n": len(items), "limit": limit, "acc": m["acc"],
                         "acc_stderr": m["acc_stderr"], "acc_norm": m.get("acc_norm"),
                         "acc_norm_stderr": m.get("acc_norm_stderr"), "requests": len(reqs),
                         "seconds": round(time.perf_counter() - t0, 2)})
            details[name] = lls
    finally:
        if was_training:
            model.train()
    return ZeroShotResult(rows, set_label, limit, time.perf_counter() - t_all, batch_size, norm_unit, details)
