"""WikiText-2 (evaluation), C4 (calibration and fine-tuning windows) and Alpaca (instructions).

Calibration follows the pruning papers (docs/methods.md#calibration-data,
docs/protocols.md#calibration): seed Python's ``random``, draw
a random C4 document, re-draw until it has more than ``seqlen`` tokens, take a random window of
``seqlen`` tokens. Fine-tuning windows use a different seed (``ft-quick`` uses 1) so they differ
from the calibration windows where the corpus allows.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Optional

import torch

from ..errors import DataNotFoundError
from .paths import find_file, hub_cache

WIKITEXT_REL = "wikitext-2/wiki.test.raw"
C4_REL = "c4/c4_sample.jsonl"
ALPACA_REL = "alpaca/alpaca_5000.json"


def _hub_wikitext() -> Path:
    from datasets import load_dataset  # optional: only when no local copy exists

    out = hub_cache("wiki.test.raw")
    if not out.exists():
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        out.write_text("\n\n".join(rows))
    return out


def _hub_c4() -> Path:
    from datasets import load_dataset

    out = hub_cache("c4_sample.jsonl")
    if not out.exists():
        ds = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
        with out.open("w") as f:
            for row in ds.select(range(1000)):
                f.write(json.dumps({"text": row["text"]}) + "\n")
    return out


def wikitext2_text(data_dir: Optional[os.PathLike] = None) -> str:
    """The raw WikiText-2 test split: the HF rows joined with "\\n\\n" (docs/protocols.md)."""
    p = find_file(WIKITEXT_REL, data_dir, hub=_hub_wikitext, what="WikiText-2 test (wiki.test.raw)")
    return p.read_text(encoding="utf-8")


def c4_documents(data_dir: Optional[os.PathLike] = None) -> list[str]:
    p = find_file(C4_REL, data_dir, hub=_hub_c4, what="C4 en train shard 00000 sample (c4_sample.jsonl)")
    docs = []
    with p.open("rb") as f:  # bytes, decoded per line: a decoding error then knows its line
        try:
            for lineno, raw in enumerate(f, 1):
                line = raw.decode("utf-8").strip()
                if line:
                    docs.append(_c4_text(json.loads(line)))
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            what = ("is not valid UTF-8" if isinstance(e, UnicodeDecodeError)
                    else f"is not a JSON object with a string 'text' ({e})")
            raise DataNotFoundError(f"{p} line {lineno} {what}: fix or delete that line, or "
                                    "restore the file") from e
    if not docs:
        raise DataNotFoundError(f"{p} holds no documents")
    return docs


def _c4_text(row) -> str:
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise TypeError("no string 'text' field")
    return row["text"]


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids as the papers' code gets them: ``tokenizer(text)`` with the tokenizer's default
    special tokens (a BOS for LLaMA; nothing for SmolLM2, whose GGUF turns BOS off)."""
    return list(tokenizer(text)["input_ids"])


def c4_windows(tokenizer, nsamples: int, seqlen: int, seed: int = 0,
               data_dir: Optional[os.PathLike] = None, max_tries: int = 100_000) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, shape ``[nsamples, seqlen]`` (papers' sampling)."""
    docs = c4_documents(data_dir)
    rng = random.Random(seed)
    out = []
    tries = 0
    while len(out) < nsamples:
        tries += 1
        if tries > max_tries:
            raise DataNotFoundError(f"C4 sample has too few documents longer than {seqlen} tokens; lower seqlen")
        ids = _encode(tokenizer, docs[rng.randint(0, len(docs) - 1)])
        if len(ids) <= seqlen:
            continue
        start = rng.randint(0, len(ids) - seqlen - 1)
        out.append(ids[start:start + seqlen])
    return torch.tensor(out, dtype=torch.long)


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """Tokenize once as one stream (docs/protocols.md), as a 1-D LongTensor."""
    return torch.tensor(_encode(tokenizer, text), dtype=torch.long)


ALPACA_PROMPT = (
    "Below is an instruction that describes a task{inp_clause}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


def alpaca_records(data_dir: Optional[os.PathLike] = None, path: Optional[os.PathLike] = None) -> list[dict]:
    """Alpaca-format records (``instruction``, ``input``, ``output``)."""
    p = Path(path) if path else find_file(ALPACA_REL, data_dir, what="Alpaca instructions (alpaca_5000.json)")
    if not p.is_file():
        raise DataNotFoundError(f"instruction data {p} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataNotFoundError(f"{p} is not valid UTF-8 (byte {e.start}): restore the file") from e
    except json.JSONDecodeError as e:
        raise DataNotFoundError(f"{p} line {e.lineno} column {e.colno} is not valid JSON ({e.msg}): fix that "
                                "line or restore the file") from e
    if not isinstance(data, list):
        raise DataNotFoundError(f"{p} is not Alpaca format: a JSON list of {{instruction, input, output}}")
    for i, r in enumerate(data):
        # every record, not a sample: one bad record deep in the file would otherwise fail mid-training
        if not (isinstance(r, dict) and isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str)
                and isinstance(r.get("input", ""), (str, type(None)))):
            raise DataNotFoundError(f"{p} record {i} (0-based) is not an Alpaca record with string instruction, "
                                    "input and output: fix or delete that record")
    return data


def alpaca_prompt(record: dict) -> str:
    """The Stanford Alpaca template (with and without ``input``)."""
    inp = (record.get("input") or "").strip()
    if inp:
        return ALPACA_PROMPT.format(inp_clause=", paired with an input that provides further context",
                                    instruction=record["instruction"], input_block=f"### Input:\n{inp}\n\n")
    return ALPACA_PROMPT.format(inp_clause="", instruction=record["instruction"], input_block="")
