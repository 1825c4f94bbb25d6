"""DSnoT's held-out acceptance (``accept="heldout"``, docs/dsnot.md#held-out-acceptance).

Why. DSnoT's guarantees are per layer: each swap lowers a row's expected (or exact calibration)
output error. The model's loss is not the sum of those errors, and at Wanda 50 % on SmolLM2-135M
the fused DSnoT model came out worse than plain Wanda (docs/dsnot.md#why-dsnot-was-worse-at-50-percent).
"DSnoT never makes the model worse" is a statement about the model, so the check is made on the
model: its loss on held-out windows (never a test split) with DSnoT's weights and with the
pruner's, keeping DSnoT only if it is lower. The fallback is exactly the pruner's model because
the refiner, under this option, feeds the pruner's block outputs forward (see
:class:`sparse_runtime.repair.dsnot_passes.DSnoTRefiner`), so nothing the pruner did depends on
DSnoT.

The ledger keeps, per linear, only the positions DSnoT changed and both values there (two int64
indices and two values per position: about 17 MB for the 350,000 swaps of Wanda 50 % on
SmolLM2-135M, against 540 MB of weights), so switching the whole model between the two costs
nothing next to the two held-out evaluations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import ConfigError


@dataclass
class _Changed:
    linear: Any  # the nn.Linear whose weight DSnoT changed
    rows: torch.Tensor
    cols: torch.Tensor
    pruner: torch.Tensor  # values at (rows, cols) with the pruner's masks
    refined: torch.Tensor  # values there after DSnoT


class SwapLedger:
    """The positions DSnoT changed in every linear, with the pruner's and DSnoT's values there."""

    def __init__(self) -> None:
        self.layers: dict[str, _Changed] = {}

    def record(self, name: str, linear, pruner_weight: torch.Tensor, refined_weight: torch.Tensor) -> None:
        rows, cols = (refined_weight != pruner_weight).nonzero(as_tuple=True)
        self.layers[name] = _Changed(linear, rows, cols, pruner_weight[rows, cols].clone(),
                                     refined_weight[rows, cols].clone())

    def apply(self, which: str) -> None:
        """Write ``"pruner"`` or ``"refined"`` values into every recorded linear."""
        for ch in self.layers.values():
            w = ch.linear.weight.data
            vals = ch.pruner if which == "pruner" else ch.refined
            w[ch.rows.to(w.device), ch.cols.to(w.device)] = vals.to(w.device, w.dtype)

    def matches_model(self) -> bool:
        """Whether every recorded linear holds DSnoT's values now (it does not when a caller restored
        another run's weights afterwards, e.g. an allocation search reusing an earlier trial)."""
        for ch in self.layers.values():
            w = ch.linear.weight.data
            if not torch.equal(w[ch.rows.to(w.device), ch.cols.to(w.device)], ch.refined.to(w.device, w.dtype)):
                return False
        return True

    @property
    def swaps(self) -> int:
        return sum(int(ch.rows.numel()) for ch in self.layers.values()) // 2


def heldout_ids(tokenizer, heldout: str, windows: int, seqlen: int, seed: int, data_dir=None) -> torch.Tensor:
    """``windows`` x ``seqlen`` held-out tokens, flat: fresh C4 windows drawn with ``seed`` (the
    caller passes calibration seed + 1000, as ATP's search does), or the start of the WikiText-2
    validation split. Never a test split."""
    from ..data.text import c4_windows, tokenize_stream

    if heldout == "c4":
        return c4_windows(tokenizer, windows, seqlen, seed, data_dir).reshape(-1)
    if heldout != "wikitext2-valid":
        raise ConfigError(f"dsnot heldout {heldout!r} is unknown; choose c4 or wikitext2-valid")
    from ..data.paths import find_file
    from ..prune import WIKITEXT2_VALID_REL

    text = find_file(WIKITEXT2_VALID_REL, data_dir, what="WikiText-2 validation split (tokens_pytorch_examples/valid.txt)"
                     ).read_text(encoding="utf-8")
    ids = tokenize_stream(tokenizer, text[: max(4000, 12 * seqlen * windows)])
    if ids.numel() < seqlen * windows:
        ids = tokenize_stream(tokenizer, text)
    return ids[: seqlen * windows]


@torch.no_grad()
def accept_on_heldout(model, ledger: SwapLedger, ids: torch.Tensor, seqlen: int,
                      desc: str = "dsnot held-out check") -> dict[str, Any]:
    """Held-out perplexity with DSnoT's weights and with the pruner's; leaves the model with the
    better one (DSnoT only if strictly lower) and returns the decision. No change: nothing to do."""
    from ..eval.perplexity import perplexity_from_ids

    if not ledger.layers or ledger.swaps == 0:
        return {"kept": True, "ppl_dsnot": None, "ppl_pruner": None, "swaps": 0}
    if not ledger.matches_model():
        raise ConfigError("dsnot accept=heldout: the model's weights are not those of the last DSnoT pass (an "
                          "allocation search such as ATP reused an earlier trial); use accept=always with it")
    ledger.apply("refined")
    with_dsnot = perplexity_from_ids(model, ids, seqlen, desc=f"{desc} (dsnot)", protocol="heldout").ppl
    ledger.apply("pruner")
    without = perplexity_from_ids(model, ids, seqlen, desc=f"{desc} (pruner)", protocol="heldout").ppl
    kept = math.isfinite(with_dsnot) and (with_dsnot < without or not math.isfinite(without))
    if kept:
        ledger.apply("refined")
    return {"kept": bool(kept), "ppl_dsnot": with_dsnot, "ppl_pruner": without, "swaps": ledger.swaps}


@torch.no_grad()
def compare_on_heldout(model, baseline, ids: torch.Tensor, seqlen: int, swaps: int,
                       desc: str = "dsnot held-out check") -> dict[str, Any]:
    """``accept="compare"``: the model as it stands (the paper's fused DSnoT pass) against the
    pruner's own pass, ``baseline = (weights, snapshot, restore)`` (the prune API's copies of every
    pruned linear); leaves the model with the better one (DSnoT only if strictly lower)."""
    from ..eval.perplexity import perplexity_from_ids

    weights, snapshot, restore = baseline
    with_dsnot = perplexity_from_ids(model, ids, seqlen, desc=f"{desc} (dsnot)", protocol="heldout").ppl
    refined = snapshot()
    restore(weights)
    without = perplexity_from_ids(model, ids, seqlen, desc=f"{desc} (pruner)", protocol="heldout").ppl
    kept = math.isfinite(with_dsnot) and (with_dsnot < without or not math.isfinite(without))
    if kept:
        restore(refined)
    return {"kept": bool(kept), "ppl_dsnot": with_dsnot, "ppl_pruner": without, "swaps": swaps}


def describe_check(check: Optional[dict[str, Any]], method: str = "the pruner") -> str:
    """One line for a user: which model the held-out check kept, and the two perplexities (empty
    when there was no check, or nothing to compare)."""
    if not check or check.get("ppl_dsnot") is None:
        return ""
    kept = "DSnoT" if check["kept"] else f"{method} alone"
    return (f"held-out check kept {kept} ({check['set']} {check['windows']}x{check['seqlen']} perplexity: with "
            f"DSnoT {check['ppl_dsnot']:.2f}, without {check['ppl_pruner']:.2f})")


__all__ = ["SwapLedger", "heldout_ids", "accept_on_heldout", "compare_on_heldout", "describe_check"]
