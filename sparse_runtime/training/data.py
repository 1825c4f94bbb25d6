"""Training data: Alpaca instructions (prompt template, loss on the response only), C4 windows,
or a plain text file; padding or packing; a deterministic order that a resume can re-enter.

Alpaca (``ft-alpaca``, Stanford template via :func:`~sparse_runtime.data.alpaca_prompt`): the prompt
is tokenised with the tokenizer's default special tokens (a BOS where the model uses one), the
response without, followed by EOS; prompt positions get label -100 so the loss is on the response
only. Examples longer than ``seq_len`` are truncated; one whose response is truncated away is
dropped. By default each example is its own sequence, right-padded to the longest in its
micro-batch (LoSA's SFTTrainer: no packing); ``packing=True`` concatenates examples into full
windows (labels still masked; attention crosses example boundaries, the usual packing shortcut).

C4 (``ft-quick``): ``steps x batch_size`` windows of ``seq_len`` tokens with the papers' sampler
seeded by ``data_seed`` (1, so they differ from the seed-0 calibration windows where the sample
allows). Held-out windows use ``data_seed + 1``.

Order: epoch e is ``randperm(n)`` from a generator seeded by (seed, e); the k-th sequence consumed
overall is a pure function of k, so the data position after any step is just ``step x batch_size``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import DataNotFoundError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def target_tokens(self) -> int:
        """Tokens that carry loss (labels shifted by one: position 0 is never a target)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    try:
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])
    except TypeError:
        return list(tokenizer(text)["input_ids"])


def _eos(tokenizer) -> Optional[int]:
    return getattr(tokenizer, "eos_token_id", None)


def alpaca_examples(tokenizer, records: list[dict], seq_len: int) -> list[Example]:
    from ..data import alpaca_prompt

    eos = _eos(tokenizer)
    out = []
    for rec in records:
        p = _ids(tokenizer, alpaca_prompt(rec), True)
        r = _ids(tokenizer, str(rec.get("output") or ""), False)
        if not r:
            continue
        if eos is not None:
            r = r + [eos]
        ids = (p + r)[:seq_len]
        labels = ([IGNORE] * len(p) + r)[:seq_len]
        ex = Example(ids, labels)
        if ex.target_tokens:
            out.append(ex)
    return out


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    ids, labels = [], []
    for e in examples:
        ids += e.input_ids
        labels += e.labels
    n = len(ids) // seq_len
    return [Example(ids[i * seq_len:(i + 1) * seq_len], labels[i * seq_len:(i + 1) * seq_len]) for i in range(n)]


def window_examples(windows: torch.Tensor) -> list[Example]:
    return [Example(w.tolist(), w.tolist()) for w in windows]


def build_datasets(cfg, tokenizer, data_dir=None) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples for ``cfg`` (a resolved TrainConfig). Clear errors for data that
    yields nothing to learn from."""
    from ..data import alpaca_records, c4_windows, tokenize_stream

    held: list[Example] = []
    if cfg.data == "alpaca":
        records = alpaca_records(data_dir, cfg.data_path)
        if cfg.eval_examples:
            if cfg.eval_examples >= len(records):
                raise DataNotFoundError(f"eval_examples={cfg.eval_examples} leaves no training records "
                                        f"(the data has {len(records)}); lower it")
            records, held_rec = records[:-cfg.eval_examples], records[-cfg.eval_examples:]
            held = alpaca_examples(tokenizer, held_rec, cfg.seq_len)
        train = alpaca_examples(tokenizer, records, cfg.seq_len)
        if cfg.packing:
            train = pack(train, cfg.seq_len)
        what = f"{len(records)} Alpaca records"
    elif cfg.data == "c4":
        n = cfg.steps * cfg.batch_size
        train = window_examples(c4_windows(tokenizer, n, cfg.seq_len, cfg.data_seed, data_dir))
        if cfg.eval_examples:
            held = window_examples(c4_windows(tokenizer, cfg.eval_examples, cfg.seq_len, cfg.data_seed + 1, data_dir))
        what = "C4 windows"
    else:
        from pathlib import Path

        p = Path(cfg.data_path)
        if not p.is_file():
            raise DataNotFoundError(f"text data {p} does not exist")
        ids = tokenize_stream(tokenizer, p.read_text(encoding="utf-8"))
        n = ids.numel() // cfg.seq_len
        wins = ids[:n * cfg.seq_len].reshape(n, cfg.seq_len) if n else ids.new_zeros(0, cfg.seq_len)
        k = min(cfg.eval_examples, max(0, n - 1))
        held = window_examples(wins[n - k:]) if k else []
        train = window_examples(wins[:n - k])
        what = f"{p} ({ids.numel()} tokens)"
    if not train:
        raise DataNotFoundError(
            f"the training data tokenises to nothing usable: {what} gave no sequence with a target token at "
            f"seq_len={cfg.seq_len} (empty responses/text, or prompts longer than seq_len). Check the data file, "
            "or raise --seq-len")
    return train, held


class DataOrder:
    """The k-th sequence consumed is ``examples[perm_e[k mod n]]`` with e = k div n."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=g)}
        return self._cache[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        return [int(self._perm(k // self.n)[k % self.n]) for k in range(start, start + count)]

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, math.ceil(self.n / batch_size))


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the micro-batch, labels -100 on padding."""
    L = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), L), IGNORE, dtype=torch.long)
    att = torch.zeros((len(examples), L), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        att[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": att}


def target_count(examples: list[Example]) -> int:
    return sum(e.target_tokens for e in examples)
