"""Distillation from the dense model: the teacher, its logit term and its per-block term.

A pruned model is repaired best towards the model it was pruned from. With ``distill`` on, the
training loss of every fine-tuning method (it lives in the shared loss module, not in a method) is

    loss = (1 - w) * CE + w * KD,     KD = T^2 * KL(p_teacher^T || p_student^T)   (logits)
                                         | sum_l ||h_s^l - h_t^l||^2 / ||h_t^l||^2   (blocks)
                                         | both terms added                          (both)

- **Logits** (Hinton, Vinyals and Dean 2015, "Distilling the knowledge in a neural network"): the
  KL divergence from the teacher's to the student's next-token distribution, both softened by the
  temperature T, multiplied by T^2 so its gradient keeps its size as T changes; summed over the
  positions that carry the cross-entropy (the same target tokens, so CE and KL share the engine's
  normalisation by the step's target-token count). It is computed in the loss module's chunks of
  positions: teacher and student logits exist for one chunk at a time, never [tokens, vocab] whole.
- **Blocks** (SquareHead, Kurtic et al. 2023, "Sparse fine-tuning for inference acceleration of
  large language models", Sec. 3): per decoder block l, the mean squared error between the student's
  and the teacher's block output on the same inputs, divided by the teacher's mean square there
  (so every block weighs alike whatever the scale of its residual stream), summed over blocks. The
  means run over the micro-batch's target positions; the term enters the step's sum as
  (target tokens of the micro-batch) x (its value), i.e. the step's value is the token-weighted mean
  over micro-batches.

Memory stays bounded: the teacher runs under ``no_grad`` in the student's dtype (and autocast), after
the student's forward; a forward hook on each teacher block compares its output with the student's
output of that block the moment it is produced (the student's own output is referenced by a hook on
the student's block, which autograd keeps anyway), and the teacher's activation is then free. What
stays until the backward is one difference tensor per block (tokens x hidden, fp32), the gradient's
operand. The teacher is never gradient-checkpointed (nothing of it is kept for backward); the student's
hooks ignore the recomputation a checkpointed backward does.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .data import IGNORE

log = logging.getLogger(__name__)

DEFAULT_CHUNK_TOKENS = 1024  # positions per LM-head chunk when distilling and loss_chunk_tokens is 0


# ---------------------------------------------------------------------------------------------
# the logit term
def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
           temperature: float) -> torch.Tensor:
    """T^2 * sum over the target positions (``labels != IGNORE``) of KL(softmax(t/T) || softmax(s/T)).

    ``student_logits``/``teacher_logits``: [positions, vocab]; computed in fp32."""
    t = float(temperature)
    logp_s = F.log_softmax(student_logits.float() / t, dim=-1)
    logp_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_pos = F.kl_div(logp_s, logp_t, log_target=True, reduction="none").sum(-1)
    return (per_pos * (labels != IGNORE)).sum() * (t * t)


def ce_kl_chunk(h: torch.Tensor, head_w: torch.Tensor, head_b, labels: torch.Tensor, h_t: Optional[torch.Tensor],
                t_head_w: Optional[torch.Tensor], t_head_b, temperature: float) -> torch.Tensor:
    """[CE sum, KL sum] of one chunk of positions: the student's logits and (with ``h_t``) the
    teacher's, used and freed here. Run under ``checkpoint`` so neither is kept for backward: the
    backward recomputes them (one more LM-head product of each model per chunk)."""
    logits = F.linear(h, head_w, head_b).float()
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    if h_t is None:
        return torch.stack([ce, ce.new_zeros(())])
    with torch.no_grad():
        t_logits = F.linear(h_t, t_head_w, t_head_b).float()
    return torch.stack([ce, kl_sum(logits, t_logits, labels, temperature)])


# ---------------------------------------------------------------------------------------------
# the block term
def block_term(h_s: torch.Tensor, h_t: torch.Tensor, pos_mask: torch.Tensor) -> torch.Tensor:
    """SquareHead's normalised MSE of one block: sum_pos ||h_s - h_t||^2 / sum_pos ||h_t||^2 over the
    positions of ``pos_mask`` ([batch, seq-1], the positions that carry the loss)."""
    m = pos_mask.to(torch.float32)
    d = h_s[:, :-1].float() - h_t[:, :-1].float()
    num = (d.pow(2).sum(-1) * m).sum()
    with torch.no_grad():
        den = (h_t[:, :-1].float().pow(2).sum(-1) * m).sum().clamp_min(torch.finfo(torch.float32).tiny)
    return num / den


def _output_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockMatcher:
    """Forward hooks on the student's and the teacher's decoder blocks (see the module docstring).

    ``begin(pos_mask)`` before the student's forward; ``student_done()`` after it (hooks then ignore
    any recomputation); the teacher's forward then appends one term per block to ``terms``;
    ``end()`` clears the references."""

    def __init__(self, student_blocks: nn.ModuleList, teacher_blocks: nn.ModuleList) -> None:
        self.collect_student = False
        self.collect_teacher = False
        self.pos_mask: Optional[torch.Tensor] = None
        self.student_out: dict[int, torch.Tensor] = {}
        self.terms: list[torch.Tensor] = []
        self.handles = [b.register_forward_hook(self._student_hook(i)) for i, b in enumerate(student_blocks)]
        self.handles += [b.register_forward_hook(self._teacher_hook(i)) for i, b in enumerate(teacher_blocks)]

    def _student_hook(self, i: int):
        def hook(_mod, _args, out):
            if self.collect_student:
                self.student_out[i] = _output_tensor(out)
        return hook

    def _teacher_hook(self, i: int):
        def hook(_mod, _args, out):
            if not self.collect_teacher:
                return
            h_s = self.student_out.pop(i, None)
            if h_s is None:
                raise RuntimeError(f"block matching: the student's block {i} produced no output in this forward")
            with torch.enable_grad():  # the teacher runs under no_grad; the term needs the student's graph
                self.terms.append(block_term(h_s, _output_tensor(out).detach(), self.pos_mask))
        return hook

    def begin(self, pos_mask: torch.Tensor) -> None:
        self.pos_mask, self.terms, self.student_out = pos_mask, [], {}
        self.collect_student = True

    def student_done(self) -> None:
        self.collect_student = False
        self.collect_teacher = True

    def end(self) -> list[torch.Tensor]:
        terms = self.terms
        self.collect_student = self.collect_teacher = False
        self.pos_mask, self.terms, self.student_out = None, [], {}
        return terms

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ---------------------------------------------------------------------------------------------
class Distiller:
    """The teacher and the settings the loss module needs; the teacher is not an ``nn.Module``
    attribute of the loss (so DDP, ``state_dict`` and the adapter files never see it)."""

    def __init__(self, teacher: nn.Module, mode: str, weight: float, temperature: float,
                 student: Optional[nn.Module] = None) -> None:
        self.teacher = teacher
        self.mode, self.weight, self.temperature = mode, float(weight), float(temperature)
        self.logits = mode in ("logits", "both")
        self.blocks = mode in ("blocks", "both")
        self.matcher: Optional[BlockMatcher] = None
        if self.blocks:
            if student is None:
                raise ValueError("block matching needs the student model")
            from ..models.family import family_of

            self.matcher = BlockMatcher(family_of(student).blocks(student), family_of(teacher).blocks(teacher))

    def close(self) -> None:
        """Remove the hooks and drop the teacher (before the merge, which needs the memory)."""
        if self.matcher is not None:
            self.matcher.remove()
            self.matcher = None
        self.teacher = None


# ---------------------------------------------------------------------------------------------
# the teacher
def teacher_spec(cfg_teacher: Optional[str], manifest, model_label: str) -> str:
    """``--distill-teacher``, else the dense model the checkpoint's manifest records (``dense_source``,
    else ``base_model``), else one clear error naming the option."""
    if cfg_teacher:
        return str(cfg_teacher)
    if manifest is not None:
        for spec in (manifest.dense_source, manifest.base_model):
            if spec:
                return str(spec)
    raise ConfigError(f"--distill needs the dense teacher, and {model_label} records none (no dense_source in a "
                      "sparsity manifest): give --distill-teacher PATH (the dense model it was pruned from)")


def load_teacher(spec: str, student: nn.Module, *, dtype: Any = None, device: Optional[torch.device] = None,
                 mode: str = "logits") -> nn.Module:
    """Load the dense teacher in the student's dtype on its device, frozen and in eval mode, and check
    that it can teach this student (same vocabulary; same number of blocks and width for ``blocks``)."""
    from ..models import load_model
    from ..models.family import family_of

    if dtype is None:
        dtype = family_of(student).embed(student).weight.dtype
    try:
        tl = load_model(spec, dtype)
    except Exception as e:  # noqa: BLE001 - one line naming the option, whatever the loader raised
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"the distillation teacher {spec!r} could not be loaded ({first}); give --distill-teacher "
                          "PATH, the dense model the checkpoint was pruned from") from e
    teacher = tl.model
    man = getattr(tl, "manifest", None)
    if man is not None and man.total_measured > 0:
        log.warning("the distillation teacher %s is itself %.1f %% sparse: distillation from the dense model "
                    "is the intended use", spec, 100 * man.total_measured)
    if device is not None:
        teacher.to(device)
    teacher.eval()
    teacher.requires_grad_(False)
    if hasattr(teacher, "config"):
        teacher.config.use_cache = False
    v_s = student.get_output_embeddings().weight.shape[0]
    v_t = teacher.get_output_embeddings().weight.shape[0]
    if v_s != v_t:
        raise ConfigError(f"the distillation teacher {spec!r} has a vocabulary of {v_t}, the model {v_s}: give "
                          "--distill-teacher PATH, the dense model the checkpoint was pruned from")
    if mode in ("blocks", "both"):
        bs, bt = family_of(student).blocks(student), family_of(teacher).blocks(teacher)
        hs = student.get_output_embeddings().weight.shape[1]
        ht = teacher.get_output_embeddings().weight.shape[1]
        if len(bs) != len(bt) or hs != ht:
            raise ConfigError(f"--distill {mode} matches block outputs, but the teacher {spec!r} has {len(bt)} blocks "
                              f"of width {ht} and the model {len(bs)} of width {hs}: use --distill logits, or give "
                              "--distill-teacher PATH with the model's own architecture")
    return teacher
