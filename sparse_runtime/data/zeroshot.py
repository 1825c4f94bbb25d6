"""The eight zero-shot sets of the pruning papers, as lm-eval-harness builds their prompts.

Each task reads one file in the layout of the shared data folder (``$SPARSE_RUNTIME_DATA`` or a
directory the user names; see ``docs/data.md``) and yields items whose prompt strings
are those of lm-eval-harness (v0.4 task YAMLs, which match the v0.3 fork Wanda used,
docs/methods.md#zero-shot-suites), so that scores are comparable with the papers' tables:

========== ============================================================ ===================== =========
task       context                                                      choices (after " ")   metrics
========== ============================================================ ===================== =========
boolq      ``{passage}\\nQuestion: {question}?\\nAnswer:``                no / yes              acc
rte        ``{premise}\\nQuestion: {hypothesis} True or False?\\nAnswer:`` True / False          acc
hellaswag  ``preprocess("{activity_label}: {ctx}")``                    preprocess(ending)    acc, acc_norm
winogrande sentence up to the blank + option (one per option)           the rest of sentence  acc
arc_*      ``Question: {question}\\nAnswer:``                            choice texts          acc, acc_norm
openbookqa ``{question_stem}``                                          choice texts          acc, acc_norm
piqa       ``Question: {goal}\\nAnswer:``                                sol1 / sol2           acc, acc_norm
========== ============================================================ ===================== =========

Two item shapes: a :class:`ChoiceItem` (one context, one continuation per choice) and, for
WinoGrande's *partial evaluation*, a :class:`PartialItem` (one partial context per option, one shared
continuation). Both expose :meth:`requests` -> ``[(context, continuation), ...]`` in choice order,
which is all the scorer needs.

Known difference (stated in the data README): the shared HellaSwag copy is a converted text file
whose ``ctx`` is not re-capitalised the way lm-eval does (``ctx_a + " " + ctx_b.capitalize()``), so
HellaSwag scores can differ slightly from lm-eval's. Everything else is the original text.
"""
from __future__ import annotations

import bz2
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

from ..errors import ConfigError, DataNotFoundError
from ..registry import Registry
from .paths import find_file, hub_cache

TARGET_DELIMITER = " "  # lm-eval's default ``target_delimiter``: continuation = " " + choice


@dataclass(frozen=True)
class ChoiceItem:
    """One context; one continuation per choice (``TARGET_DELIMITER + choice``); ``gold`` indexes choices."""

    context: str
    choices: tuple[str, ...]
    gold: int

    @property
    def continuations(self) -> list[str]:
        return [TARGET_DELIMITER + c for c in self.choices]

    def requests(self) -> list[tuple[str, str]]:
        return [(self.context, c) for c in self.continuations]

    def norm_texts(self) -> list[str]:
        """The strings whose length normalises ``acc_norm``: lm-eval uses the choice WITHOUT the delimiter."""
        return list(self.choices)


@dataclass(frozen=True)
class PartialItem:
    """WinoGrande partial scoring: the shared ``continuation`` under each partial ``contexts[i]``."""

    contexts: tuple[str, ...]
    continuation: str  # includes the leading delimiter
    gold: int

    @property
    def choices(self) -> tuple[str, ...]:
        return self.contexts

    def requests(self) -> list[tuple[str, str]]:
        return [(c, self.continuation) for c in self.contexts]

    def norm_texts(self) -> list[str]:
        return [self.continuation.lstrip(TARGET_DELIMITER)] * len(self.contexts)


Item = Union[ChoiceItem, PartialItem]


@dataclass(frozen=True)
class ZeroShotTask:
    """A registered task: where its file lives and how lm-eval turns a record into a prompt."""

    name: str
    relpath: str  # inside the data directory
    what: str  # human description for error messages and docs
    parse: Callable[[Path], Iterator[Item]]
    metrics: tuple[str, ...]
    n_choices: Optional[int]  # None: varies per item (ARC has 3-5)
    total: int  # records in the full split (data README), for "limit" reporting
    hub: Optional[Callable[[], Path]] = None

    def path(self, data_dir: Optional[os.PathLike] = None) -> Path:
        return find_file(self.relpath, data_dir, hub=self.hub, what=f"{self.what} ({self.relpath})")

    def load(self, data_dir: Optional[os.PathLike] = None, limit: Optional[int] = None) -> list[Item]:
        """The first ``limit`` items (all when None), in file order (the ``quick`` prefix convention)."""
        if limit is not None and limit < 1:
            raise ConfigError(f"limit must be a positive number of items, got {limit}")
        p = self.path(data_dir)
        items: list[Item] = []
        try:
            for item in self.parse(p):
                items.append(item)
                if limit is not None and len(items) >= limit:
                    break
        except (KeyError, ValueError, IndexError, json.JSONDecodeError) as e:
            raise DataNotFoundError(f"{p} is not in the expected {self.name} format ({type(e).__name__}: {e}); "
                                    f"expected the layout of the shared data README") from e
        if not items:
            raise DataNotFoundError(f"{p} holds no {self.name} items")
        return items


ZEROSHOT_TASKS: Registry[ZeroShotTask] = Registry("zero-shot task")

#: Named task sets. Wanda's seven (also LoRS); ATP swaps RTE for PIQA; "all" = the eight.
TASK_SETS: dict[str, list[str]] = {
    "wanda": ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"],
    "atp": ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"],
    "all": ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa"],
}


def resolve_tasks(tasks: Union[None, str, Sequence[str]]) -> tuple[str, list[str]]:
    """``None``/"all"/"wanda"/"atp"/"boolq,rte"/["boolq", ...] -> (set label, task names).

    Unknown names fail early with the list of choices (before any model work)."""
    if tasks is None:
        tasks = "all"
    if isinstance(tasks, str):
        key = tasks.strip().lower()
        if key in TASK_SETS:
            return key, list(TASK_SETS[key])
        tasks = [t for t in key.split(",") if t.strip()]
    names: list[str] = []
    for t in tasks:
        t = str(t).strip().lower().replace("-", "_")
        if t in TASK_SETS:
            names += [n for n in TASK_SETS[t] if n not in names]
            continue
        if t not in ZEROSHOT_TASKS:
            raise ConfigError(f"unknown zero-shot task {t!r}; choose tasks from: {', '.join(ZEROSHOT_TASKS.names())} "
                              f"or a set: {', '.join(TASK_SETS)}")
        if t not in names:
            names.append(t)
    if not names:
        raise ConfigError(f"no zero-shot tasks given; choose task names ({', '.join(ZEROSHOT_TASKS.names())}) "
                          f"or a set ({', '.join(TASK_SETS)})")
    for label, members in TASK_SETS.items():
        if names == members:
            return label, names
    return "custom", names


def load_task(name: str, data_dir: Optional[os.PathLike] = None, limit: Optional[int] = None) -> list[Item]:
    return ZEROSHOT_TASKS.get(name).load(data_dir, limit)


# --------------------------------------------------------------------------------------------
# File readers
# --------------------------------------------------------------------------------------------

def _jsonl(p: Path) -> Iterator[dict]:
    with p.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _register(task: ZeroShotTask) -> ZeroShotTask:
    return ZEROSHOT_TASKS.register(task.name)(task)


# BoolQ (SuperGLUE, lm-eval ``boolq``): choices ["no", "yes"], label True -> "yes".
def _boolq(p: Path) -> Iterator[Item]:
    for d in _jsonl(p):
        label = d["label"]
        if isinstance(label, str):
            label = {"true": True, "false": False}[label.lower()]
        yield ChoiceItem(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ("no", "yes"), int(bool(label)))


# RTE (lm-eval ``rte`` = GLUE RTE; SuperGLUE's copy has the same text): label 0 = entailment -> "True".
_RTE_LABEL = {"entailment": 0, "not_entailment": 1, 0: 0, 1: 1}


def _rte(p: Path) -> Iterator[Item]:
    for d in _jsonl(p):
        premise = d.get("premise", d.get("sentence1"))
        hypothesis = d.get("hypothesis", d.get("sentence2"))
        yield ChoiceItem(f"{premise}\nQuestion: {hypothesis} True or False?\nAnswer:", ("True", "False"),
                         _RTE_LABEL[d["label"]])


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's ``hellaswag/utils.py::preprocess`` (WikiHow bracket artefacts removed)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


# HellaSwag, converted text: 6 lines per task: "activity_label: ctx", gold, 4 endings.
def _hellaswag(p: Path) -> Iterator[Item]:
    with bz2.open(p, "rt", encoding="utf-8") if p.suffix == ".bz2" else p.open(encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    if len(lines) % 6:
        raise ValueError(f"{len(lines)} lines is not a multiple of 6 (context, gold, 4 endings)")
    for i in range(0, len(lines), 6):
        ctx, gold, endings = lines[i], int(lines[i + 1]), lines[i + 2:i + 6]
        if not 0 <= gold < 4:
            raise ValueError(f"gold index {gold} at line {i + 2}")
        yield ChoiceItem(hellaswag_preprocess(ctx), tuple(hellaswag_preprocess(e) for e in endings), gold)


# WinoGrande (converted to lm-eval's partial form: context up to the blank + option; the rest).
def _winogrande(p: Path) -> Iterator[Item]:
    for d in _jsonl(p):
        if "context_options" in d:
            contexts, target, gold = d["context_options"], d["continuation"], int(d["gold"])
        else:  # original format: sentence with "_", option1, option2, answer "1"/"2"
            i = d["sentence"].index("_")
            contexts = [d["sentence"][:i] + d["option1"], d["sentence"][:i] + d["option2"]]
            target, gold = d["sentence"][i + 1:], int(d["answer"]) - 1
        yield PartialItem(tuple(contexts), TARGET_DELIMITER + target.strip(), gold)


# ARC (original AI2 format). lm-eval: gold = choices.label.index(answerKey); labels are A-E or 1-5.
def _arc(p: Path) -> Iterator[Item]:
    for d in _jsonl(p):
        q = d["question"]
        labels = [c["label"] for c in q["choices"]]
        yield ChoiceItem(f"Question: {q['stem']}\nAnswer:", tuple(c["text"] for c in q["choices"]),
                         labels.index(d["answerKey"].strip()))


# OpenBookQA main test: the converted jsonl (query = question_stem, choices, gold), or the release TSV.
def _openbookqa(p: Path) -> Iterator[Item]:
    if p.suffix == ".tsv":
        with p.open(encoding="utf-8") as f:
            next(f)
            for line in f:
                if not line.strip():
                    continue
                _id, stem, choices, _full, key = line.rstrip("\n").split("\t")
                texts = [t.strip() for t in re.split(r"\([A-D]\) ", choices)[1:]]
                yield ChoiceItem(stem, tuple(texts), "ABCD".index(key.strip()))
        return
    for d in _jsonl(p):
        yield ChoiceItem(d["query"], tuple(d["choices"]), int(d["gold"]))


# PIQA validation (original): valid.jsonl + valid-labels.lst beside it.
def _piqa(p: Path) -> Iterator[Item]:
    labels_path = p.with_name("valid-labels.lst")
    if not labels_path.is_file():
        raise DataNotFoundError(f"PIQA labels not found: {labels_path} (expected beside {p.name})")
    labels = [int(x) for x in labels_path.read_text().split()]
    for d, label in zip(_jsonl(p), labels, strict=True):
        yield ChoiceItem(f"Question: {d['goal']}\nAnswer:", (d["sol1"], d["sol2"]), label)


# --------------------------------------------------------------------------------------------
# Hub fallbacks: fetch the original split with `datasets` (optional) and write it in the local
# layout under the cache, so the same reader serves both. Used only when no data dir has the file.
# --------------------------------------------------------------------------------------------

def _hub_jsonl(cache_name: str, dataset: tuple, split: str, convert: Callable[[dict], dict]) -> Callable[[], Path]:
    def fetch() -> Path:
        from datasets import load_dataset  # optional dependency

        out = hub_cache(cache_name)
        if not out.exists():
            rows = load_dataset(*dataset, split=split)
            tmp = out.with_suffix(".tmp")
            with tmp.open("w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(convert(dict(row))) + "\n")
            tmp.replace(out)
        return out

    return fetch


def _hub_hellaswag() -> Path:
    from datasets import load_dataset

    out = hub_cache("hellaswag_val.txt")
    if not out.exists():
        lines = []
        for d in load_dataset("Rowan/hellaswag", split="validation"):
            # lm-eval's own query construction (with ctx_b capitalised), written in the 6-line layout
            ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
            lines += [f"{d['activity_label']}: {ctx}", str(int(d["label"])), *d["endings"]]
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def _hub_piqa() -> Path:
    from datasets import load_dataset

    d = hub_cache("piqa")
    d.mkdir(parents=True, exist_ok=True)
    out = d / "valid.jsonl"
    if not out.exists():
        rows = load_dataset("baber/piqa", split="validation")  # the copy lm-eval 0.4 uses
        (d / "valid-labels.lst").write_text("\n".join(str(r["label"]) for r in rows) + "\n")
        out.write_text("".join(json.dumps({"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"]}) + "\n"
                               for r in rows), encoding="utf-8")
    return out


def _arc_hub(name: str) -> Callable[[], Path]:
    def conv(r: dict) -> dict:
        ch = r["choices"]
        return {"question": {"stem": r["question"],
                             "choices": [{"text": t, "label": lab} for t, lab in zip(ch["text"], ch["label"])]},
                "answerKey": r["answerKey"]}

    return _hub_jsonl(f"{name}-Test.jsonl", ("allenai/ai2_arc", name), "test", conv)


_register(ZeroShotTask(
    "boolq", "boolq/val.jsonl", "BoolQ validation (SuperGLUE)", _boolq, ("acc",), 2, 3270,
    _hub_jsonl("boolq_val.jsonl", ("google/boolq",), "validation",
               lambda r: {"question": r["question"], "passage": r["passage"], "label": bool(r["answer"])})))
_register(ZeroShotTask(
    "rte", "rte/val.jsonl", "RTE validation (GLUE/SuperGLUE)", _rte, ("acc",), 2, 277,
    _hub_jsonl("rte_val.jsonl", ("nyu-mll/glue", "rte"), "validation",
               lambda r: {"premise": r["sentence1"], "hypothesis": r["sentence2"], "label": int(r["label"])})))
_register(ZeroShotTask(
    "hellaswag", "hellaswag/hellaswag_val_full.txt.bz2", "HellaSwag validation (converted text)", _hellaswag,
    ("acc", "acc_norm"), 4, 10042, _hub_hellaswag))
_register(ZeroShotTask(
    "winogrande", "winogrande/winogrande.jsonl", "WinoGrande dev (xl)", _winogrande, ("acc",), 2, 1267,
    _hub_jsonl("winogrande_dev.jsonl", ("allenai/winogrande", "winogrande_xl"), "validation",
               lambda r: {"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"],
                          "answer": r["answer"]})))
_register(ZeroShotTask(
    "arc_easy", "arc/ARC-Easy-Test.jsonl", "ARC-Easy test", _arc, ("acc", "acc_norm"), None, 2376,
    _arc_hub("ARC-Easy")))
_register(ZeroShotTask(
    "arc_challenge", "arc/ARC-Challenge-Test.jsonl", "ARC-Challenge test", _arc, ("acc", "acc_norm"), None, 1172,
    _arc_hub("ARC-Challenge")))
_register(ZeroShotTask(
    "openbookqa", "openbookqa/openbook_qa.jsonl", "OpenBookQA main test", _openbookqa, ("acc", "acc_norm"), 4, 500,
    _hub_jsonl("openbookqa_test.jsonl", ("allenai/openbookqa", "main"), "test",
               lambda r: {"query": r["question_stem"], "choices": list(r["choices"]["text"]),
                          "gold": list(r["choices"]["label"]).index(r["answerKey"].strip())})))
_register(ZeroShotTask(
    "piqa", "piqa/valid.jsonl", "PIQA validation", _piqa, ("acc", "acc_norm"), 2, 1838, _hub_piqa))
