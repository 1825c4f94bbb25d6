"""The ``prune`` CLI and recipe stage, end to end on tiny models under the ``test`` protocol."""
from __future__ import annotations

import json

import pytest

import sparse_runtime as sr
from sparse_runtime.cli import main


def test_cli_prune_wanda_end_to_end(tmp_path, capsys):
    out = tmp_path / "pruned"
    rc = main(["prune", "tiny-llama", "--method", "wanda", "--sparsity", "0.5", "--out", str(out), "--protocol", "test"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "measured 0.5000" in printed and "calibration forwards" in printed
    lm = sr.load_model(out)  # manifest verified on load
    m = lm.manifest
    assert m.dense_source == "tiny-llama"
    assert m.total_measured == pytest.approx(0.5) and m.total_target == pytest.approx(0.5)
    step = m.history[-1]
    assert step["stage"] == "prune" and step["method"] == "wanda" and step["calibration"]["protocol"] == "test"
    assert (out / "layer_sparsity.png").is_file()
    report = json.loads((out / "prune_report.json").read_text())
    assert report["sparsity_measured"] == pytest.approx(0.5)


def test_cli_prune_atp_nm_and_options(tmp_path):
    out = tmp_path / "atp"
    rc = main(["prune", "tiny-mistral", "--method", "sparsegpt", "--sparsity", "0.6", "--allocation", "atp",
               "--atp-beta", "0.1", "--exclude", "*.down_proj", "--out", str(out), "--protocol", "test"])
    assert rc == 0
    m = sr.read_manifest(out)
    assert m.layers["model.layers.0.self_attn.q_proj"].target == pytest.approx(0.55)
    assert m.layers["model.layers.1.self_attn.q_proj"].target == pytest.approx(0.65)
    assert m.layers["model.layers.1.mlp.down_proj"].target == 0.0
    assert m.layers["model.layers.1.mlp.down_proj"].measured == 0.0
    out2 = tmp_path / "nm"
    assert main(["prune", "tiny-qwen2", "--method", "magnitude", "--structure", "4:8", "--out", str(out2)]) == 0
    assert all(r.structure == "4:8" for r in sr.read_manifest(out2).layers.values())


@pytest.mark.parametrize("argv, msg", [
    (["--sparsity", "1.2"], "[0, 1)"),
    (["--sparsity", "0.5", "--method", "obs"], "unknown pruning method"),
    (["--structure", "3:5"], "multiple of M=5"),
    (["--sparsity", "0.5", "--allocation", "atp", "--atp-beta", "2"], "out of range"),
    (["--structure", "2:4", "--allocation", "owl"], "cannot be combined with N:M"),
    (["--sparsity", "0.5", "--refine", "nosuch"], "unknown refiner"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, msg):
    out = tmp_path / "never"
    rc = main(["prune", "tiny-llama", *argv, "--out", str(out), "--protocol", "test"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.startswith("error: ") and "Traceback" not in err
    assert not out.exists()


def test_cli_refuses_existing_output_before_loading(tmp_path, capsys, monkeypatch):
    import sparse_runtime.models as models

    out = tmp_path / "exists"
    out.mkdir()
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded before checking --out"))
    assert main(["prune", "tiny-llama", "--sparsity", "0.5", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_refine_dsnot_is_resolved_through_the_fixed_table(tmp_path, capsys):
    """Fused prune + DSnoT once ``sparse_runtime.repair.dsnot`` registers its refiner; until then a
    clear one-line error."""
    from sparse_runtime.pruning import REFINERS
    from sparse_runtime.prune import resolve_refiner

    try:
        resolve_refiner("dsnot")
    except sr.ConfigError as e:
        assert "dsnot" in str(e)
        pytest.skip(f"DSnoT refiner not available yet: {e}")
    out = tmp_path / "fused"
    assert main(["prune", "tiny-llama", "--sparsity", "0.5", "--refine", "dsnot", "--out", str(out),
                 "--protocol", "test"]) == 0
    m = sr.read_manifest(out)
    assert m.history[-1]["refine"] == "dsnot" and m.total_measured == pytest.approx(0.5)
    assert "dsnot" in REFINERS
    capsys.readouterr()
    assert main(["prune", "tiny-llama", "--sparsity", "0.5", "--refine", "dsnot", "--refine-option", "accept=compare",
                 "--refine-option", "heldout_windows=2", "--out", str(tmp_path / "cmp"), "--protocol", "test"]) == 0
    assert "held-out check kept " in capsys.readouterr().out  # the decision is printed, with both perplexities


def test_recipe_prune_stage(tmp_path):
    from sparse_runtime.recipe import Recipe, run_recipe

    recipe = Recipe.from_dict({"name": "t", "model": "tiny-llama", "protocol": "test", "steps": [
        {"stage": "prune", "method": "wanda", "sparsity": 0.6, "allocation": "owl", "owl_lambda": 0.05},
    ]})
    ctx = run_recipe(recipe, tmp_path / "run")
    rec = ctx.results[-1]
    assert rec["metrics"]["sparsity_target"] == pytest.approx(0.6)
    lm = sr.load_model(ctx.model)
    assert lm.manifest.history[-1]["allocation"] == "owl" and lm.manifest.dense_source == "tiny-llama"
    with pytest.raises(sr.ConfigError, match="unknown option"):
        Recipe.from_dict({"model": "tiny-llama", "steps": [{"stage": "prune", "sparsty": 0.5}]}).validate()
    with pytest.raises(sr.ConfigError, match=r"\[0, 1\)"):
        Recipe.from_dict({"model": "tiny-llama", "steps": [{"stage": "prune", "sparsity": 1.5}]}).validate()
