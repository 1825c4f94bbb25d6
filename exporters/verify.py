"""Self-verification of an export: logits against PyTorch, sparsity pattern against the source.

Every exporter reloads what it wrote and compares it with the float32 PyTorch model it came from:

- **logits** on a fixed prompt (prefill) and, for formats with a KV cache, one decode step that
  feeds the cache back. The tolerance depends on the export dtype: ``|diff| <= atol + rtol *
  max|ref|`` (float32: 1e-3 + 1e-4 x scale; float16: 2e-2 + 2e-2 x scale; bfloat16: 5e-2 +
  5e-2 x scale). The greedy-token (argmax) agreement is reported beside it; on a random tiny model
  near-ties make it a weaker signal than the max difference, so it is reported, not gated.
- **relative L2** (:func:`relative_check`) for the lossy formats (``onnx-int8`` / ``onnx-int4``, the
  quantized ``gguf`` types): ``||got - ref|| / ||ref||`` against a gate that catches garbage, with
  max |diff| and top-1 agreement reported beside it.
- **sparsity and pattern**: every pruned layer's keep-mask digest must be found in the export
  (float32: exactly the source mask; reduced precision may only *lose* nonzeros that underflow to
  zero in the new dtype, which is counted and reported), and N:M layers must still comply.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from sparse_runtime.errors import SparseRuntimeError
from sparse_runtime.sparsity import NMPattern, mask_digest, nm_compliant, parse_structure

FIXED_PROMPT = ("The capital of France is Paris. Sparse networks keep only the weights that matter, "
                "and a good export must give the same answers as the model it came from.")
PROMPT_TOKENS = 24

# (atol, rtol) on |logit difference|, scaled by max |reference logit|
TOLERANCES = {"float32": (1e-3, 1e-4), "float16": (2e-2, 2e-2), "bfloat16": (5e-2, 5e-2)}


class ExportVerificationError(SparseRuntimeError):
    """An export that, reloaded, does not reproduce its source model; nothing was written."""


def fixed_prompt_ids(tokenizer, vocab_size: int, length: int = PROMPT_TOKENS, batch: int = 1) -> torch.Tensor:
    """The fixed verification prompt as ``[batch, length]`` ids (row b is shifted by b tokens so a
    batch of 2 is not two copies of the same row)."""
    ids: list[int] = []
    if tokenizer is not None:
        try:
            enc = tokenizer(FIXED_PROMPT, add_special_tokens=False)
            ids = list(enc["input_ids"])
        except Exception:  # a tokenizer with another call convention
            ids = list(tokenizer.encode(FIXED_PROMPT))
    if len(ids) < length + batch:
        ids = (ids or list(range(1, 64))) * ((length + batch) // max(1, len(ids) or 63) + 2)
    rows = [[int(t) % vocab_size for t in ids[b:b + length]] for b in range(batch)]
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def torch_reference(model, ids: torch.Tensor, decode: bool = True) -> dict[str, torch.Tensor]:
    """Prefill logits, the greedy next token, and the logits of one cached decode step."""
    out = model(input_ids=ids, use_cache=decode)
    res = {"prefill": out.logits.float()}
    if decode:
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long)
        pos = torch.full((ids.shape[0], 1), ids.shape[1], dtype=torch.long)
        step = model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values,
                     use_cache=True)
        res["next_token"] = nxt
        res["decode"] = step.logits.float()
    return res


@dataclass
class LogitCheck:
    name: str
    max_abs_diff: float
    max_abs_ref: float
    tolerance: float
    argmax_agreement: float
    ok: bool


def compare_logits(name: str, ref, got, dtype: str) -> LogitCheck:
    ref = np.asarray(ref.detach().float().numpy() if isinstance(ref, torch.Tensor) else ref, dtype=np.float64)
    got = np.asarray(got.detach().float().numpy() if isinstance(got, torch.Tensor) else got, dtype=np.float64)
    if ref.shape != got.shape:
        raise ExportVerificationError(f"{name}: export returned logits of shape {got.shape}, PyTorch {ref.shape}")
    atol, rtol = TOLERANCES.get(dtype, TOLERANCES["bfloat16"])
    scale = float(np.abs(ref).max())
    diff = float(np.abs(ref - got).max()) if np.isfinite(got).all() else float("inf")
    tol = atol + rtol * scale
    agree = float((ref.argmax(-1) == got.argmax(-1)).mean())
    return LogitCheck(name, diff, scale, tol, agree, bool(diff <= tol))


def relative_check(name: str, ref, got, tol: float) -> dict[str, Any]:
    """Relative L2 error ``||got - ref|| / ||ref||`` against ``tol``, with the max |diff| and the
    top-1 (argmax) agreement beside it."""
    ref = np.asarray(ref.detach().float().numpy() if hasattr(ref, "detach") else ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        raise ExportVerificationError(f"{name}: export returned logits of shape {got.shape}, PyTorch {ref.shape}")
    finite = bool(np.isfinite(got).all())
    rel = float(np.linalg.norm(ref - got) / max(np.linalg.norm(ref), 1e-30)) if finite else float("inf")
    return {"name": name, "relative_l2": rel, "tolerance": tol,
            "max_abs_diff": float(np.abs(ref - got).max()) if finite else float("inf"),
            "max_abs_ref": float(np.abs(ref).max()),
            "argmax_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()), "ok": bool(rel <= tol)}


@dataclass
class MaskCheck:
    layers: int
    matched: int
    underflow_zeros: int
    nm_violations: list[str]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems and not self.nm_violations


def check_layer_masks(source_manifest, exported: dict[str, torch.Tensor], dtype: str) -> MaskCheck:
    """Compare exported weights (by layer name) with the source manifest's masks and structures."""
    matched, underflow, viol, problems = 0, 0, [], []
    for name, rec in source_manifest.layers.items():
        w = exported.get(name)
        if w is None:
            problems.append(f"{name}: missing from the export")
            continue
        keep = w != 0
        if mask_digest(keep) == rec.mask_sha256 and int(keep.sum()) == rec.nnz:
            matched += 1
        else:
            nnz = int(keep.sum())
            if dtype != "float32" and nnz < rec.nnz:
                underflow += rec.nnz - nnz  # only a subset check is possible without the source mask
            else:
                problems.append(f"{name}: {nnz} nonzeros in the export, {rec.nnz} in the source")
        pattern = parse_structure(rec.structure)
        if isinstance(pattern, NMPattern) and not nm_compliant(w, pattern):
            viol.append(f"{name} breaks {rec.structure}")
    return MaskCheck(len(source_manifest.layers), matched, underflow, viol, problems)


def check_masks_in_pool(source_manifest, pool: Iterable[np.ndarray], dtype: str) -> MaskCheck:
    """For exports that rename weights (ONNX graphs): every source layer's mask must be found among
    the export's 2-D weights, as W or as W transposed (MatMul stores W^T)."""
    digests: dict[str, int] = {}
    for arr in pool:
        if arr.ndim != 2:
            continue
        t = torch.from_numpy(np.array(arr, copy=True))
        for m in (t != 0, (t != 0).T):
            digests.setdefault(mask_digest(m), int(m.sum()))
    matched, problems = 0, []
    for name, rec in source_manifest.layers.items():
        if rec.mask_sha256 in digests:
            matched += 1
        else:
            problems.append(f"{name}: its keep-mask is not found among the exported weights")
    if dtype != "float32" and problems:  # underflow may have changed a mask; report, do not fail
        return MaskCheck(len(source_manifest.layers), matched, -1, [], [])
    return MaskCheck(len(source_manifest.layers), matched, 0, [], problems)


def summarize(logits: list[LogitCheck], masks: Optional[MaskCheck], extra: Optional[dict] = None) -> dict[str, Any]:
    rep: dict[str, Any] = {"logits": [asdict(c) for c in logits]}
    if masks is not None:
        rep["masks"] = {"layers": masks.layers, "matched": masks.matched, "underflow_zeros": masks.underflow_zeros,
                        "nm_violations": masks.nm_violations, "problems": masks.problems}
    rep.update(extra or {})
    rep["ok"] = all(c.ok for c in logits) and (masks is None or masks.ok)
    return rep


def raise_if_failed(report: dict[str, Any], what: str) -> None:
    if report.get("ok"):
        return
    bad = [f"{c['name']}: max |logit diff| {c['max_abs_diff']:.3g} > tolerance {c['tolerance']:.3g}"
           for c in report.get("logits", []) if not c["ok"]]
    m = report.get("masks") or {}
    bad += list(m.get("problems", []))[:3] + list(m.get("nm_violations", []))[:3]
    raise ExportVerificationError(f"the {what} export does not reproduce its source model, so it was not written: "
                                  + "; ".join(bad) + ". This is a bug in the exporter or the runtime; "
                                  "rerun with verify=False only to inspect the files")
