"""The recipe runner and the CLI on tiny models."""
import json

import pytest

import sparse_runtime as sr
from sparse_runtime.cli import main
from sparse_runtime.recipe import Recipe, run_recipe


def test_recipe_runs_and_resumes(tmp_path, data_dir, capsys):
    r = Recipe.from_dict({"name": "t", "model": "tiny-llama", "protocol": "test",
                          "steps": [{"stage": "load"}, {"stage": "evaluate"}, {"stage": "report"}]})
    ctx = run_recipe(r, tmp_path)
    assert (tmp_path / "report.md").is_file()
    ppl = ctx.results[1]["metrics"]["perplexity"]["ppl"]
    assert ppl > 1
    capsys.readouterr()
    run_recipe(r, tmp_path)
    assert "skipped (resume)" in capsys.readouterr().out
    assert "protocol: test" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("steps,match", [
    ([{"stage": "nope"}], "unknown recipe stage"),
    ([{"stage": "evaluate", "bogus": 1}], "unknown option"),
    ([{"stage": "evaluate", "ppl": "yes"}], "true/false"),
    ([{"stage": "evaluate", "limit": 0}], "positive"),
    ([{"nostage": 1}], "needs a 'stage'"),
])
def test_recipe_bad_input_before_work(tmp_path, steps, match):
    with pytest.raises(sr.ConfigError, match=match):
        run_recipe(Recipe.from_dict({"model": "tiny-llama", "steps": steps}), tmp_path)
    assert not any(tmp_path.iterdir())


def test_cli_inspect_and_errors(tmp_path, capsys):
    lm = sr.load_model("tiny-llama")
    sr.save_checkpoint(lm.model, lm.tokenizer, tmp_path / "c", sr.build_manifest(lm.model))
    assert main(["inspect", str(tmp_path / "c"), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "total sparsity: 0.0000" in out and "manifest: verified" in out
    assert json.loads((tmp_path / "r.json").read_text())["layers"][0]["layer"].startswith("model.layers.0")
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_run_recipe_file(tmp_path, data_dir):
    (tmp_path / "r.yaml").write_text("name: x\nmodel: tiny-qwen2\nprotocol: test\nsteps:\n  - stage: load\n  - stage: evaluate\n")
    assert main(["run", str(tmp_path / "r.yaml"), "--workdir", str(tmp_path / "w")]) == 0
    assert json.loads((tmp_path / "w" / "01-evaluate" / "step.json").read_text())["metrics"]["perplexity"]["ppl"] > 1
