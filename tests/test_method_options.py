"""Each method's options live in its own dataclass; the flat PruneConfig fields are aliases."""
from __future__ import annotations

import pytest
import torch

import sparse_runtime as sr
from sparse_runtime.allocation import ATPOptions, OWLOptions
from sparse_runtime.cli import main
from sparse_runtime.errors import ConfigError
from sparse_runtime.options import options_from_dict, parse_option, parse_options
from sparse_runtime.prune import PruneConfig, make_allocator, make_pruner, prune_model
from sparse_runtime.pruning import SparseGPTOptions


def _pruned_weights(**kw) -> dict[str, torch.Tensor]:
    lm = sr.load_model("tiny-llama")
    prune_model(lm.model, lm.tokenizer, PruneConfig(protocol="test", **kw), family=lm.family)
    return {n: lin.weight.detach().clone() for n, lin in lm.family.iter_linears(lm.model)}


def test_method_options_and_their_old_aliases_give_the_same_weights():
    old = _pruned_weights(method="sparsegpt", sparsity=0.6, percdamp=0.05, blocksize=16, allocation="owl",
                          owl_lambda=0.1)
    new = _pruned_weights(method="sparsegpt", sparsity=0.6, method_options={"percdamp": 0.05, "blocksize": 16},
                          allocation="owl", allocation_options={"lam": 0.1})
    assert all(torch.equal(old[n], new[n]) for n in old)


def test_options_are_built_validated_and_named_in_errors():
    cfg = PruneConfig(method="sparsegpt", sparsity=0.5, method_options={"percdamp": 0.02}, allocation="atp",
                      allocation_options={"beta": "0.01", "atp_candidates": 2})
    cfg.validate()
    assert make_pruner(cfg).options == SparseGPTOptions(percdamp=0.02)
    assert make_allocator(cfg).options == ATPOptions(beta=0.01, candidates=2)
    bad = [
        (dict(method="sparsegpt", method_options={"blocksiz": 8}), r"unknown option\(s\) \['blocksiz'\]; known: \['blocksize', 'percdamp', 'quant'\]"),
        (dict(method="sparsegpt", method_options={"blocksize": "big"}), "blocksize: expected int, got 'big'"),
        (dict(method="sparsegpt", structure="2:4", sparsity=None, method_options={"blocksize": 6}), "multiple of M=4"),
        (dict(method="sparsegpt", percdamp=0.1, method_options={"percdamp": 0.2}), "given twice"),
        (dict(method="wanda", method_options={"percdamp": 0.2}), "known: none"),
        (dict(allocation="owl", allocation_options={"lam": 0.6}), "lam"),
        (dict(allocation="owl", allocation_options={"m": 0}), "must be > 0"),
        (dict(allocation="atp", allocation_options={"heldout": "wikitext2-test"}), "never the test"),
        (dict(method_options=[1, 2]), "mapping"),
    ]
    for kw, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            PruneConfig(**({"sparsity": 0.5} | kw)).validate()


def test_options_from_dict_is_the_shared_helper():
    assert options_from_dict(OWLOptions, {"m": 3}, "allocation 'owl' option") == OWLOptions(m=3.0)
    with pytest.raises(ConfigError, match="takes no options"):
        options_from_dict(None, {"x": 1}, "method 'x' option")
    from sparse_runtime import options, recipe

    assert recipe.make_config is options.make_config  # moved, still importable from recipe


def test_command_line_values_are_yaml_scalars_never_code():
    assert parse_option("a=3") == ("a", 3) and parse_option("a=0.5") == ("a", 0.5)
    assert parse_option("a=true") == ("a", True) and parse_option("a=auto") == ("a", "auto")
    assert parse_option("a=!!python/name:os.system") == ("a", "!!python/name:os.system")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_option("a")
    with pytest.raises(ConfigError, match="single"):
        parse_option("a=[1, 2]")
    with pytest.raises(ConfigError, match="twice"):
        parse_options(["a=1", "a=2"])


def test_cli_allocation_and_method_options(tmp_path, capsys):
    out = tmp_path / "owl"
    assert main(["prune", "tiny-llama", "--method", "sparsegpt", "--method-option", "percdamp=0.05",
                 "--allocation", "owl", "--allocation-option", "lam=0.1", "--allocation-option", "m=3",
                 "--sparsity", "0.5", "--out", str(out), "--protocol", "test"]) == 0
    step = sr.read_manifest(out).history[-1]
    assert step["options"] == {"method": {"percdamp": 0.05, "blocksize": 128, "quant": None}, "allocation": {"m": 3.0, "lam": 0.1}}
    assert step["allocation_info"]["owl_lambda"] == 0.1
    assert main(["prune", "tiny-llama", "--allocation", "owl", "--allocation-option", "lambda=0.1",
                 "--sparsity", "0.5", "--out", str(tmp_path / "bad"), "--protocol", "test"]) == 2
    assert "known: ['lam', 'm']" in capsys.readouterr().err


def test_losa_takes_any_registered_pruner_and_its_options():
    from sparse_runtime.losa.config import LoSAConfig

    with pytest.raises(ConfigError, match="unknown pruning method 'nope'; choose one of: magnitude, sparsegpt, wanda"):
        LoSAConfig(prune_method="nope", steps=0).validate()
    LoSAConfig(prune_method="sparsegpt", prune_options={"percdamp": 0.05}, steps=0).validate()
