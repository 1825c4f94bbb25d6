"""CLI (`sparse-runtime export`, `engines`) and the recipe stage."""
import json

import pytest

from exporters import read_export_manifest
from wanda_reference import make_checkpoint
from sparse_runtime.cli import main
from sparse_runtime.errors import ConfigError
from sparse_runtime.recipe import Recipe, run_recipe


def test_cli_export_bitmask_and_semi_structured(tmp_path, capsys):
    ck = make_checkpoint(tmp_path / "ck", "qwen2", structure="2:4")
    assert main(["export", str(ck), "--format", "bitmask", "--out", str(tmp_path / "bm"), "--dtype", "fp16"]) == 0
    assert read_export_manifest(tmp_path / "bm")["options"]["dtype"] == "float16"
    assert main(["export", str(ck), "--format", "semi-structured", "--out", str(tmp_path / "ss")]) == 0
    out = capsys.readouterr().out
    assert "max |logit diff|" in out and "14/14 layers" in out
    # existing output and unknown options are one-line errors (exit 2)
    assert main(["export", str(ck), "--format", "bitmask", "--out", str(tmp_path / "bm")]) == 2
    assert main(["export", str(ck), "--format", "bitmask", "--out", str(tmp_path / "x"), "-o", "nope=1"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "unknown option" in err


def test_cli_refuses_non_24(tmp_path, capsys):
    ck = make_checkpoint(tmp_path / "ck", "llama", 0.5)
    assert main(["export", str(ck), "--format", "semi-structured", "--out", str(tmp_path / "ss")]) == 2
    assert "is not 2:4" in capsys.readouterr().err


def test_engines_list(capsys):
    assert main(["engines", "list"]) == 0
    out = capsys.readouterr().out
    assert "deepsparse:" in out and "onnxruntime:" in out and "llamacpp:" in out and "licence" in out


def test_recipe_stage_export(tmp_path):
    recipe = Recipe.from_dict({"model": "tiny-mistral", "protocol": "test", "steps": [
        {"stage": "export", "format": "onnx", "options": {"dtype": "float16"}}]})
    ctx = run_recipe(recipe, tmp_path / "run")
    m = ctx.results[0]["metrics"]
    assert m["verified"] is True and m["format"] == "onnx" and ctx.model == "tiny-mistral"
    assert json.loads((tmp_path / "run" / "00-export" / "onnx" / "export_manifest.json").read_text())["options"]["dtype"] == "float16"


def test_recipe_stage_validates_before_work():
    bad = Recipe.from_dict({"model": "tiny-llama", "steps": [{"stage": "export", "format": "tflite"}]})
    with pytest.raises(ConfigError, match="export.format"):
        bad.validate()
    bad = Recipe.from_dict({"model": "tiny-llama", "steps": [{"stage": "export", "format": "bitmask",
                                                               "options": {"optimize": "basic"}}]})
    with pytest.raises(ConfigError, match="unknown option"):
        bad.validate()
