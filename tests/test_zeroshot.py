"""Zero-shot loaders (real files, lm-eval prompt formats) and the lm-eval-style scorer."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_runtime.data.zeroshot import (TASK_SETS, ZEROSHOT_TASKS, ChoiceItem, PartialItem, hellaswag_preprocess,
                                          resolve_tasks)
from sparse_runtime.errors import ConfigError, DataNotFoundError
from sparse_runtime.eval.zeroshot import (encode_pair, evaluate_zeroshot, loglikelihoods, protocol_limit,
                                          score_items)
from sparse_runtime.models import ByteTokenizer, tiny_model

ALL = TASK_SETS["all"]


# ------------------------------------------------------------------------------------------ loaders

@pytest.mark.parametrize("name", ALL)
def test_loader_reads_real_file(name, data_dir):
    task = ZEROSHOT_TASKS.get(name)
    items = task.load(data_dir, limit=50)
    assert len(items) == 50
    for it in items:
        k = len(it.requests())
        if task.n_choices is not None:
            assert k == task.n_choices
        else:
            assert 3 <= k <= 5  # ARC has 3-5 choices
        assert 0 <= it.gold < k
        for ctx, cont in it.requests():
            assert ctx and cont.startswith(" ") and cont.strip()
    assert len(task.load(data_dir)) == task.total  # the whole split (record counts of the data README)


def test_prompt_formats_first_items(data_dir):
    """The exact lm-eval strings (task YAMLs of lm-eval 0.4.13) for the first record of each file."""
    boolq = ZEROSHOT_TASKS.get("boolq").load(data_dir, 1)[0]
    first = json.loads((data_dir / "boolq/val.jsonl").open().readline())
    assert boolq.context == f"{first['passage']}\nQuestion: {first['question']}?\nAnswer:"
    assert boolq.continuations == [" no", " yes"] and boolq.gold == int(first["label"])

    rte = ZEROSHOT_TASKS.get("rte").load(data_dir, 1)[0]
    assert rte.context == ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
                           "according to the Christopher Reeve Foundation.\nQuestion: Christopher Reeve had an "
                           "accident. True or False?\nAnswer:")
    assert rte.continuations == [" True", " False"] and rte.gold == 1  # not_entailment -> "False"

    hs = ZEROSHOT_TASKS.get("hellaswag").load(data_dir, 1)[0]
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. he"
    assert hs.continuations[3] == " starts pulling up roofing on a roof." and hs.gold == 3

    wg = ZEROSHOT_TASKS.get("winogrande").load(data_dir, 1)[0]
    assert isinstance(wg, PartialItem)
    assert wg.requests() == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                             ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert wg.gold == 1

    arc = ZEROSHOT_TASKS.get("arc_easy").load(data_dir, 1)[0]
    assert arc.context == ("Question: Which statement best explains why photosynthesis is the foundation of most "
                           "food webs?\nAnswer:")
    assert arc.continuations[0] == " Sunlight is the source of energy for nearly all ecosystems." and arc.gold == 0

    obqa = ZEROSHOT_TASKS.get("openbookqa").load(data_dir, 1)[0]
    assert obqa.context.startswith("A person wants to start saving money") and obqa.context.endswith("save money is to")
    assert obqa.continuations[1] == " quit eating lunch out" and obqa.gold == 1

    piqa = ZEROSHOT_TASKS.get("piqa").load(data_dir, 1)[0]
    assert piqa.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert len(piqa.continuations) == 2 and piqa.gold == 0


def test_arc_numeric_labels_and_obqa_tsv_agree(data_dir):
    """ARC answer keys are letters or digits: gold = choices.label.index(answerKey), as lm-eval 0.4."""
    rows = [json.loads(line) for line in (data_dir / "arc/ARC-Easy-Test.jsonl").open()]
    items = ZEROSHOT_TASKS.get("arc_easy").load(data_dir)
    numeric = [(r, it) for r, it in zip(rows, items) if r["answerKey"].isdigit()]
    assert numeric
    for r, it in numeric:
        assert r["question"]["choices"][it.gold]["label"] == r["answerKey"]
    # the converted OpenBookQA jsonl and the original release TSV give the same items
    from sparse_runtime.data.zeroshot import _openbookqa
    tsv = list(_openbookqa(data_dir / "openbookqa/test.tsv"))
    assert tsv == ZEROSHOT_TASKS.get("openbookqa").load(data_dir)


def test_hellaswag_preprocess_is_lm_evals():
    assert hellaswag_preprocess(" Foo [title] Bar [step] baz  qux ") == "Foo. Bar baz qux"


def test_task_sets_and_resolution():
    assert "rte" in TASK_SETS["wanda"] and "piqa" not in TASK_SETS["wanda"]
    assert "piqa" in TASK_SETS["atp"] and "rte" not in TASK_SETS["atp"]
    assert sorted(TASK_SETS["all"]) == ZEROSHOT_TASKS.names() and len(TASK_SETS["all"]) == 8
    assert resolve_tasks(None) == ("all", TASK_SETS["all"])
    assert resolve_tasks("wanda") == ("wanda", TASK_SETS["wanda"])
    assert resolve_tasks("boolq, ARC-Easy") == ("custom", ["boolq", "arc_easy"])
    with pytest.raises(ConfigError, match="unknown zero-shot task 'nope'.*boolq.*wanda"):
        resolve_tasks("boolq,nope")
    with pytest.raises(ConfigError):
        protocol_limit("bogus")
    assert protocol_limit("quick") == 500 and protocol_limit("paper") is None


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSE_RUNTIME_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataNotFoundError) as e:
        ZEROSHOT_TASKS.get("piqa").load(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "piqa/valid.jsonl") in msg and "SPARSE_RUNTIME_DATA" in msg
    # evaluate_zeroshot fails on data before touching the model
    with pytest.raises(DataNotFoundError, match="BoolQ"):
        evaluate_zeroshot(None, None, tasks="boolq", data_dir=tmp_path)
    # a file in the wrong format names itself
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte/val.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DataNotFoundError, match="rte"):
        ZEROSHOT_TASKS.get("rte").load(tmp_path)


# ------------------------------------------------------------------------------------------ scorer

class BigramStub(nn.Module):
    """A causal 'LM' whose next-byte log-probs depend only on the current byte: logits = table[id].

    Its log-likelihoods are known in closed form, so the scorer's choice can be checked exactly."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())
        self.config = type("Cfg", (), {"max_position_embeddings": 4096})()

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return type("Out", (), {"logits": self.table[input_ids]})()


def _bigram(prefs: dict[tuple[str, str], float], seed: int = 0) -> BigramStub:
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(256, 256, generator=g) * 0.1
    for (a, b), v in prefs.items():
        table[ord(a), ord(b)] = v
    return BigramStub(table)


def _closed_form(stub: BigramStub, context: str, continuation: str) -> float:
    ids = list((context + continuation).encode())
    lp = F.log_softmax(stub.table.detach(), -1)
    n = len(context.encode())
    return sum(lp[ids[i - 1], ids[i]].item() for i in range(n, len(ids)))


def test_scorer_picks_the_right_answer_on_a_constructed_case():
    tok = ByteTokenizer()
    stub = _bigram({(":", " "): 2.0, (" ", "q"): 6.0, ("q", "q"): 6.0})  # " qq" is very likely after ":"
    item = ChoiceItem("A:", ("zz", "qq", "zq"), gold=1)
    res = loglikelihoods(stub, tok, item.requests(), batch_size=2)
    for (ctx, cont), (ll, _) in zip(item.requests(), res):
        assert ll == pytest.approx(_closed_form(stub, ctx, cont), abs=1e-5)
    assert res[1][1] is True  # greedy: every token of " qq" is the argmax
    m = score_items([item], [ll for ll, _ in res], ("acc", "acc_norm"))
    assert m["acc"] == 1.0 and m["acc_norm"] == 1.0


def test_acc_norm_divides_by_bytes_of_the_choice():
    # equal log-likelihoods: acc takes the first; by BYTES "é" (2 bytes) and "ab" (2) tie -> first;
    # by characters "é" is 1 char, so its per-char loss is worse -> "ab".
    item = ChoiceItem("Q:", ("é", "ab"), gold=1)
    assert score_items([item], [-4.0, -4.0])["acc_norm"] == 0.0
    assert score_items([item], [-4.0, -4.0], norm_unit="chars")["acc_norm"] == 1.0
    # a long right answer loses on the sum but wins per byte (lm-eval excludes the leading space)
    item = ChoiceItem("Q:", ("abcdefgh", "ab"), gold=0)
    m = score_items([item], [-8.0, -5.0])
    assert m["acc"] == 0.0 and m["acc_norm"] == 1.0
    with pytest.raises(ConfigError):
        score_items([item], [-8.0, -5.0], norm_unit="tokens")


def test_winogrande_partial_scoring():
    """The shared continuation is scored under each partial context; the context decides."""
    tok = ByteTokenizer()
    stub = _bigram({("B", " "): 5.0, ("A", " "): -5.0})
    item = PartialItem(("so A", "so B"), " went home.", gold=1)
    res = loglikelihoods(stub, tok, item.requests())
    assert res[0][0] < res[1][0]
    for (ctx, cont), (ll, _) in zip(item.requests(), res):
        assert ll == pytest.approx(_closed_form(stub, ctx, cont), abs=1e-5)
    assert score_items([item], [ll for ll, _ in res], ("acc",)) == {"acc": 1.0, "acc_stderr": pytest.approx(math.nan,
                                                                                                         nan_ok=True)}


def test_encode_pair_moves_trailing_space_and_splits_the_whole():
    tok = ByteTokenizer()
    assert encode_pair(tok, "Answer: ", "yes") == (list(b"Answer:"), list(b" yes"))
    assert encode_pair(tok, "", "x") == ([tok.eos_token_id], list(b"x"))


def test_encode_pair_with_a_subword_tokenizer():
    """On SmolLM2's BPE tokenizer " yes" stays one token after "Answer:" (encode whole, split)."""
    d = Path("~/.cache/sparse-runtime/models/smollm2-135m").expanduser()
    if not (d / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 tokenizer not cached")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    ctx, cont = encode_pair(tok, "Question: is it?\nAnswer:", " yes")
    assert len(cont) == 1 and tok.decode(cont) == " yes"
    assert ctx + cont == tok.encode("Question: is it?\nAnswer: yes", add_special_tokens=False)


def _plain_loglikelihood(model, context_ids, cont_ids, max_length):
    """A direct per-request computation mirroring lm-eval's ``_loglikelihood_tokens`` (batch 1, no pads)."""
    whole = (context_ids + cont_ids)[-(max_length + 1):]
    inp = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logits = model(inp, use_cache=False).logits[0].float()
    lp = F.log_softmax(logits[-len(cont_ids):], -1)
    return lp[torch.arange(len(cont_ids)), torch.tensor(cont_ids)].sum().item()


def test_batched_scoring_equals_unbatched_per_item(data_dir):
    model = tiny_model("llama", seed=3)
    tok = ByteTokenizer()
    reqs = []
    for name in ("boolq", "hellaswag", "winogrande", "arc_challenge"):
        reqs += [r for it in ZEROSHOT_TASKS.get(name).load(data_dir, 2) for r in it.requests()]
    reqs.append(("Same context", " a"))
    reqs.append(("Same context", " b"))  # same input tokens: one shared forward
    batched = loglikelihoods(model, tok, reqs, batch_size=5, max_length=256)  # boolq passages get truncated
    single = loglikelihoods(model, tok, reqs, batch_size=1, max_length=256)
    for (ctx, cont), (b, _), (s, _) in zip(reqs, batched, single):
        c_ids, k_ids = encode_pair(tok, ctx, cont)
        ref = _plain_loglikelihood(model, c_ids, k_ids, 256)
        assert b == pytest.approx(ref, abs=2e-4) and s == pytest.approx(ref, abs=2e-4)


def test_evaluate_zeroshot_result_shape(data_dir):
    model = tiny_model("llama", seed=0)
    r = evaluate_zeroshot(model, ByteTokenizer(), tasks="winogrande,piqa", limit=3, batch_size=4, data_dir=data_dir)
    assert [row["task"] for row in r.rows] == ["winogrande", "piqa"]
    assert all(row["n"] == 3 and row["limit"] == 3 for row in r.rows)
    assert r.rows[0]["acc_norm"] is None and r.rows[1]["acc_norm"] is not None
    assert r.mean_acc == pytest.approx((r.rows[0]["acc"] + r.rows[1]["acc"]) / 2)
    d = r.as_dict()
    assert d["limit"] == 3 and "first 3 items" in d["limit_note"] and d["task_set"] == "custom"
    json.dumps(d)
    assert "| mean (custom) |" in r.markdown()
    # scores are the argmax of the per-item log-likelihoods it kept
    assert len(r.item_loglikelihoods["piqa"]) == 6


def test_eval_cli_on_tiny_llama(tmp_path, capsys):
    from sparse_runtime.cli import main

    out = tmp_path / "eval.json"
    rc = main(["eval", "tiny-llama", "--zeroshot", "boolq,arc_easy", "--limit", "2", "--ppl", "--protocol", "test",
               "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| arc_easy | 2 | 2 |" in text and "perplexity" in text
    d = json.loads(out.read_text())
    assert d["zeroshot"]["limit"] == 2 and len(d["zeroshot"]["rows"]) == 2 and d["perplexity"]["protocol"] == "test"
    assert main(["eval", "tiny-llama", "--zeroshot", "nope"]) == 2
    assert main(["eval", "tiny-llama", "--zeroshot", "boolq", "--limit", "0"]) == 2
