"""WikiText-2 perplexity exactly as the pruning papers compute it (docs/protocols.md#perplexity).

Tokenize the whole test text once, cut non-overlapping windows of ``seqlen`` tokens (remainder
dropped), batch 1. Per window the NLL is the mean cross-entropy over the ``seqlen - 1`` shifted
targets times ``seqlen``; ppl = exp(sum NLL / (n_windows * seqlen)). (The ``* seqlen`` then
``/ seqlen`` is the papers' convention; it equals exp of the mean per-window mean CE.)
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..progress import progress
from ..protocols import Protocol, get_protocol


@dataclass
class PerplexityResult:
    ppl: float
    seqlen: int
    windows: int
    tokens: int
    seconds: float
    protocol: str

    def as_dict(self) -> dict:
        return asdict(self)


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def window_count(ids: torch.Tensor, seqlen: int, max_windows: Optional[int] = None) -> int:
    """Non-overlapping windows of ``seqlen`` in the flat ``ids`` (remainder dropped), at most
    ``max_windows``; one clear line when there is not even one."""
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ConfigError(f"the text has {ids.numel()} tokens: fewer than one window of seqlen={seqlen}")
    return n


@torch.no_grad()
def perplexity_from_ids(model, ids: torch.Tensor, seqlen: int, max_windows: Optional[int] = None,
                        desc: str = "perplexity", protocol: str = "custom") -> PerplexityResult:
    ids = ids.reshape(-1)
    n = window_count(ids, seqlen, max_windows)
    dev = model_device(model)
    t0 = time.perf_counter()
    nll_sum = 0.0
    for i in progress(range(n), desc=desc, total=n):
        x = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0).to(dev)
        logits = model(x, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[0, :-1], x[0, 1:])
        nll_sum += loss.item() * seqlen
    ppl = math.exp(nll_sum / (n * seqlen))
    return PerplexityResult(ppl, seqlen, n, n * seqlen, time.perf_counter() - t0, protocol)


def wikitext2_perplexity(model, tokenizer, protocol="quick", data_dir=None,
                         seqlen: Optional[int] = None, max_windows: Optional[int] = -1) -> PerplexityResult:
    """Perplexity on WikiText-2 test under a named protocol (``quick`` or ``paper``); ``seqlen`` and
    ``max_windows`` override it (``max_windows=None`` means all windows)."""
    from ..data.text import tokenize_stream, wikitext2_text

    proto: Protocol = get_protocol(protocol)
    seqlen = seqlen or proto.eval_seqlen
    windows = proto.eval_windows if max_windows == -1 else max_windows
    ids = tokenize_stream(tokenizer, wikitext2_text(data_dir))
    return perplexity_from_ids(model, ids, seqlen, windows, desc=f"wikitext2 ppl [{proto.name}]", protocol=proto.name)


def _carried_nll(carry, windows: torch.Tensor, desc: str) -> float:
    """Sum over windows of (mean shifted cross-entropy x seqlen), as :func:`perplexity_from_ids`."""
    n, seqlen = windows.shape
    nll_sum = 0.0
    for i, logits in enumerate(progress(carry.logits(), desc=desc, total=n)):
        x = windows[i].unsqueeze(0)
        loss = F.cross_entropy(logits.float()[0, :-1], x[0, 1:])
        nll_sum += loss.item() * seqlen
    return nll_sum


@torch.no_grad()
def streamed_nll(carry, windows: torch.Tensor, desc: str = "perplexity", protocol: str = "custom") -> PerplexityResult:
    """Perplexity of windows already carried through every block of a streamed model
    (:class:`sparse_runtime.models.streaming.StreamedForward`), by the same formula as
    :func:`perplexity_from_ids`."""
    t0 = time.perf_counter()
    n, seqlen = windows.shape
    nll_sum = _carried_nll(carry, windows, desc)
    return PerplexityResult(math.exp(nll_sum / (n * seqlen)), seqlen, n, n * seqlen, time.perf_counter() - t0,
                            protocol)


@torch.no_grad()
def streamed_perplexity(streamed, ids: torch.Tensor, seqlen: int, max_windows: Optional[int] = None,
                        desc: str = "perplexity", protocol: str = "custom",
                        group_bytes: int = 1 << 30) -> PerplexityResult:
    """:func:`perplexity_from_ids` on a model read block by block from its files
    (:class:`sparse_runtime.models.streaming.StreamedModel`): the windows' activations are carried
    through each block in turn, in groups of windows whose activations fit ``group_bytes`` (each
    group reads the model once), so memory is one block plus one group, whatever the depth."""
    from ..models.streaming import StreamedForward

    ids = ids.reshape(-1)
    n = window_count(ids, seqlen, max_windows)
    windows = ids[: n * seqlen].view(n, seqlen)
    per_window = seqlen * int(streamed.config.hidden_size) * torch.empty((), dtype=streamed.dtype).element_size()
    g = max(1, min(n, group_bytes // max(1, per_window)))
    t0 = time.perf_counter()
    nll_sum = 0.0
    for s in range(0, n, g):
        part = windows[s:s + g]
        carry = StreamedForward(streamed, part)
        for bi in progress(range(streamed.n_blocks), desc=f"{desc} [windows {s + 1}-{s + part.shape[0]}/{n}]"):
            carry.step(streamed.load_block(bi))
            streamed.release_block(bi)
        nll_sum += _carried_nll(carry, part, desc)
    return PerplexityResult(math.exp(nll_sum / (n * seqlen)), seqlen, n, n * seqlen, time.perf_counter() - t0,
                            protocol)
