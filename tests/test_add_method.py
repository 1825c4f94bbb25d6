"""Adding a method is one file and one registry line (docs/architecture.md, "Adding a method").

The toy pruner lives in ONE module, tests/toy_random_pruner.py, with its own options dataclass; it is
loaded the way a user loads a plugin (``SPARSE_RUNTIME_PLUGINS``) and then used, with its own option,
from the command line and from a recipe. Nothing else in the package knows about it. A recipe names
methods, never modules: it cannot load the plugin itself.
"""
from __future__ import annotations

import sys

import pytest
import torch
import yaml

import sparse_runtime as sr
from sparse_runtime.cli import main
from sparse_runtime.pruning import PRUNERS

PLUGIN = "toy_random_pruner"


@pytest.fixture
def plugin(monkeypatch):
    """The plugin loaded through the environment, in a registry copy that the test leaves behind."""
    monkeypatch.setattr(PRUNERS, "_items", dict(PRUNERS._items))
    monkeypatch.setenv("SPARSE_RUNTIME_PLUGINS", PLUGIN)
    sys.modules.pop(PLUGIN, None)
    yield
    sys.modules.pop(PLUGIN, None)


def _masks(path) -> dict[str, torch.Tensor]:
    lm = sr.load_model(path)  # the manifest is verified on load
    return {n: lin.weight != 0 for n, lin in lm.family.iter_linears(lm.model)}


def test_toy_pruner_from_the_cli_with_its_own_option(plugin, tmp_path, capsys):
    out3, out4 = tmp_path / "seed3", tmp_path / "seed4"
    base = ["prune", "tiny-llama", "--method", "toy-random", "--sparsity", "0.5", "--protocol", "test"]
    assert main(base + ["--method-option", "seed=3", "--out", str(out3)]) == 0
    assert main(base + ["--method-option", "seed=4", "--out", str(out4)]) == 0
    assert "measured 0.5000" in capsys.readouterr().out
    step = sr.read_manifest(out3).history[-1]
    assert step["method"] == "toy-random" and step["options"]["method"] == {"seed": 3}
    assert step["config"]["method_options"] == {"seed": 3}
    m3, m4 = _masks(out3), _masks(out4)
    assert any(not torch.equal(m3[n], m4[n]) for n in m3)  # the option reached the pruner
    # the method's own options are checked like every other method's: one line, the known ones
    assert main(base + ["--method-option", "sed=3", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown option(s) ['sed']" in err and "known: ['seed']" in err and len(err.splitlines()) == 1
    assert main(base + ["--method-option", "seed=three", "--out", str(tmp_path / "bad")]) == 2
    assert "seed: expected int, got 'three'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_toy_pruner_from_a_recipe_with_its_own_option(plugin, tmp_path, capsys):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(yaml.safe_dump({"name": "toy", "model": "tiny-llama", "protocol": "test", "steps": [
        {"stage": "prune", "method": "toy-random", "sparsity": 0.5, "method_options": {"seed": 3}}]}))
    assert main(["run", str(recipe), "--workdir", str(tmp_path / "run")]) == 0
    assert main(["prune", "tiny-llama", "--method", "toy-random", "--sparsity", "0.5", "--protocol", "test",
                 "--method-option", "seed=3", "--out", str(tmp_path / "cli")]) == 0
    from_recipe, from_cli = _masks(tmp_path / "run" / "00-prune" / "model"), _masks(tmp_path / "cli")
    assert all(torch.equal(from_recipe[n], from_cli[n]) for n in from_cli)  # same option, same masks


def test_a_recipe_cannot_load_a_plugin(tmp_path, capsys, monkeypatch):
    """Without the user's SPARSE_RUNTIME_PLUGINS the method is unknown, and a recipe has no key that
    would import a module."""
    monkeypatch.delenv("SPARSE_RUNTIME_PLUGINS", raising=False)
    if "toy-random" in PRUNERS:
        pytest.skip("the toy pruner is registered in this process already")
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(yaml.safe_dump({"name": "toy", "model": "tiny-llama", "steps": [
        {"stage": "prune", "method": "toy-random", "sparsity": 0.5}]}))
    assert main(["run", str(recipe), "--workdir", str(tmp_path / "run")]) == 2
    assert "unknown pruning method 'toy-random'" in capsys.readouterr().err
    recipe.write_text(yaml.safe_dump({"name": "toy", "model": "tiny-llama", "plugins": [PLUGIN], "steps": [
        {"stage": "prune", "method": "toy-random", "sparsity": 0.5}]}))
    assert main(["run", str(recipe), "--workdir", str(tmp_path / "run")]) == 2
    assert "unknown top-level key(s) ['plugins']" in capsys.readouterr().err
    assert PLUGIN not in sys.modules


def test_a_plugin_that_fails_to_import_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SPARSE_RUNTIME_PLUGINS", "no_such_plugin_module")
    assert main(["prune", "tiny-llama", "--sparsity", "0.5", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot import plugin module 'no_such_plugin_module'" in err and len(err.splitlines()) == 1
