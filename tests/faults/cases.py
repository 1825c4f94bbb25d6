"""The table of bad inputs: one :class:`Case` per row, grouped by verb.

Placeholders in ``argv``: ``{P}`` pruned checkpoint, ``{A}`` adapter, ``{O}`` ONNX export, ``{D}``
plain dense model, ``{DATA}`` small data directory (see conftest.World), ``{T}`` the case's own
directory (whatever ``setup`` made there is hashed before and after, like the shared fixtures).
Patterns match the one error line and name the fix ("choose another --out", "pass --overwrite", ...).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .harness import Case

LAYER = "model.layers.0.mlp.up_proj"
OUT_FIX = r"choose another --out|pass --overwrite|name a new directory"


# -- setups: each makes one bad input in T --------------------------------------------------------

def mkdir(name):
    def f(w, T):
        (T / name).mkdir(parents=True)
        (T / name / "keep.txt").write_text("an earlier result")
    return f


def write(name, data: bytes | str):
    def f(w, T):
        p = T / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return f


def copy(src_attr: str, name: str, then=None):
    def f(w, T):
        shutil.copytree(getattr(w, src_attr), T / name)
        if then:
            then(T / name)
    return f


def manifest_edit(edit):
    """A copy of P at T/ck whose manifest is ``edit``ed (a function of the parsed JSON)."""
    def then(d: Path):
        p = d / "sparsity_manifest.json"
        data = json.loads(p.read_text())
        edit(data)
        p.write_text(json.dumps(data))
    return copy("P", "ck", then)


def set_layer(key, value):
    return manifest_edit(lambda d: d["layers"][LAYER].__setitem__(key, value))


def set_top(key, value):
    return manifest_edit(lambda d: d.__setitem__(key, value))


def tamper_weights(d: Path):
    """Flip one zero of one layer to a nonzero in the safetensors file (manifest left as is)."""
    from safetensors.torch import load_file, save_file

    f = d / "model.safetensors"
    sd = load_file(str(f))
    w = sd[LAYER + ".weight"]
    idx = (w == 0).nonzero()[0]
    w[tuple(idx)] = 1.0
    save_file(sd, str(f), metadata={"format": "pt"})


def drop_record(d: Path):
    p = d / "sparsity_manifest.json"
    data = json.loads(p.read_text())
    del data["layers"][LAYER]
    p.write_text(json.dumps(data))


def drop_tensor(d: Path):
    from safetensors.torch import load_file, save_file

    f = d / "model.safetensors"
    sd = load_file(str(f))
    del sd[LAYER + ".weight"]
    save_file(sd, str(f), metadata={"format": "pt"})


def data_dir(c4_lines=None, alpaca=None):
    """T/data: the small data set with a corrupt C4 file and/or Alpaca file."""
    def f(w, T):
        shutil.copytree(w.DATA, T / "data")
        if c4_lines is not None:
            good = (w.DATA / "c4" / "c4_sample.jsonl").read_bytes().splitlines()[:10]
            lines = [x if isinstance(x, bytes) else x.encode() for x in c4_lines]
            (T / "data" / "c4" / "c4_sample.jsonl").write_bytes(b"\n".join(good + lines) + b"\n")
        if alpaca is not None:
            (T / "data" / "alpaca" / "alpaca_5000.json").write_bytes(
                alpaca if isinstance(alpaca, bytes) else alpaca.encode())
    return f


def gguf_truncated(w, T):
    from sparse_runtime.models.loading import smollm2_gguf_path

    with open(smollm2_gguf_path(), "rb") as f:
        (T / "t.gguf").write_bytes(f.read(200_000))


def recipe(text):
    return write("r.yaml", text)


PRUNE = ["prune", "tiny-llama", "--sparsity", "0.5", "--protocol", "test", "--data-dir", "{DATA}"]
FT = ["--data", "c4", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--data-dir", "{DATA}"]
LORS = ["finetune", "{P}", "--method", "lors", "--rank", "2", "--init-samples", "2", *FT]
SEFT = ["finetune", "{P}", "--method", "seft", *FT]
LOSA = ["finetune", "tiny-llama", "--method", "losa", "--sparsity", "0.5", "--rounds", "2", "--rank", "4", "--protocol", "test", *FT]
REPAIR = ["repair", "{P}", "--protocol", "test", "--data-dir", "{DATA}"]
EXPORT = ["export", "{P}", "--format", "onnx"]
MERGE = ["merge", "{A}"]
MANIFEST_FIX = r"inspect DIR --write-manifest|restore it"

CASES: list[Case] = [
    # ---- prune: options --------------------------------------------------------------------------
    Case("prune-sparsity-above-1", [*PRUNE, "--sparsity", "1.2", "--out", "{T}/o"], r"\[0, 1\)"),
    Case("prune-sparsity-negative", [*PRUNE, "--sparsity", "-0.1", "--out", "{T}/o"], r"\[0, 1\)"),
    Case("prune-sparsity-not-a-number", [*PRUNE, "--sparsity", "half", "--out", "{T}/o"], r"invalid float value"),
    Case("prune-unknown-method", [*PRUNE, "--method", "obs", "--out", "{T}/o"], r"unknown pruning method.*choose"),
    Case("prune-nm-does-not-divide", ["prune", "tiny-llama", "--structure", "3:5", "--out", "{T}/o"], r"multiple of M=5"),
    Case("prune-nm-contradicts-sparsity", [*PRUNE, "--structure", "3:5", "--out", "{T}/o"],
         r"prunes exactly 0.6.*drop the sparsity option"),
    Case("prune-nm-garbage", [*PRUNE, "--structure", "two:four", "--out", "{T}/o"], r"N:M|2:4"),
    Case("prune-atp-beta-out-of-range", [*PRUNE, "--allocation", "atp", "--atp-beta", "2", "--out", "{T}/o"],
         r"out of range"),
    Case("prune-nm-with-owl", ["prune", "tiny-llama", "--structure", "2:4", "--allocation", "owl", "--out", "{T}/o"],
         r"cannot be combined with N:M"),
    Case("prune-unknown-allocation", [*PRUNE, "--allocation", "best", "--out", "{T}/o"], r"unknown allocation.*choose"),
    Case("prune-unknown-refiner", [*PRUNE, "--refine", "nosuch", "--out", "{T}/o"], r"unknown refiner"),
    Case("prune-refine-option-no-equals", [*PRUNE, "--refine-option", "x", "--out", "{T}/o"], r"KEY=VALUE"),
    Case("prune-unknown-protocol", ["prune", "tiny-llama", "--sparsity", "0.5", "--protocol", "fast", "--out", "{T}/o"],
         r"unknown protocol.*choose"),
    Case("prune-bad-dtype", [*PRUNE, "--dtype", "int7", "--out", "{T}/o"], r"dtype.*float32"),
    Case("prune-device-cuda-without-cuda", [*PRUNE, "--device", "cuda", "--out", "{T}/o"],
         r"no CUDA device.*--device cpu"),
    Case("prune-nsamples-zero", [*PRUNE, "--nsamples", "0", "--out", "{T}/o"], r"nsamples"),
    # ---- prune: --out ----------------------------------------------------------------------------
    Case("prune-out-exists", [*PRUNE, "--out", "{T}/o"], r"already exists.*--overwrite", setup=mkdir("o")),
    Case("prune-out-dot", [*PRUNE, "--out", "."], r"current directory.*name a new directory", cwd="{T}"),
    Case("prune-out-dot-overwrite", [*PRUNE, "--out", ".", "--overwrite"], r"current directory.*name a new directory",
         cwd="{T}", setup=write("precious.txt", "keep me")),
    Case("prune-out-parent-of-cwd", [*PRUNE, "--out", "..", "--overwrite"], r"current directory", cwd="{T}/sub",
         setup=mkdir("sub")),
    Case("prune-out-is-input", ["prune", "{T}/ck", "--sparsity", "0.6", "--protocol", "test", "--data-dir", "{DATA}",
                                "--out", "{T}/ck", "--overwrite"], r"is the input.*choose another --out",
         setup=copy("P", "ck")),
    Case("prune-out-inside-input", ["prune", "{T}/ck", "--sparsity", "0.6", "--out", "{T}/ck/sub"],
         r"is the input.*choose another --out", setup=copy("P", "ck")),
    Case("prune-out-is-a-file", [*PRUNE, "--out", "{T}/f", "--overwrite"], r"is a file.*choose another --out",
         setup=write("f", "x")),
    Case("prune-out-under-a-file", [*PRUNE, "--out", "{T}/f/o"], r"is a file.*choose another --out",
         setup=write("f", "x")),
    Case("prune-out-empty", [*PRUNE, "--out", ""], r"--out is empty"),
    # ---- prune: bad models -----------------------------------------------------------------------
    Case("prune-model-missing", ["prune", "{T}/nope", "--sparsity", "0.5", "--out", "{T}/o"], r"does not exist"),
    Case("prune-model-not-hf-dir", ["prune", "{T}/d", "--sparsity", "0.5", "--out", "{T}/o"],
         r"not a Hugging Face model directory", setup=mkdir("d")),
    Case("prune-model-pickle-only", ["prune", "{T}/d", "--sparsity", "0.5", "--out", "{T}/o"],
         r"safetensors|pickle", setup=lambda w, T: (shutil.copytree(w.D, T / "d"),
                                                     (T / "d" / "model.safetensors").rename(T / "d" / "pytorch_model.bin"))),
    Case("prune-config-corrupt", ["prune", "{T}/ck", "--sparsity", "0.6", "--out", "{T}/o"], r"config\.json",
         setup=copy("P", "ck", lambda d: (d / "config.json").write_text("{not json"))),
    Case("prune-unknown-tiny", ["prune", "tiny-gpt", "--sparsity", "0.5", "--out", "{T}/o"], r"unknown tiny model.*choose"),
    Case("prune-gguf-not-gguf", ["prune", "{T}/bad.gguf", "--sparsity", "0.5", "--out", "{T}/o"],
         r"not a GGUF file.*download", setup=write("bad.gguf", "hello")),
    Case("prune-gguf-truncated", ["prune", "{T}/t.gguf", "--sparsity", "0.5", "--out", "{T}/o"],
         r"damaged or truncated GGUF.*download", setup=gguf_truncated),
    Case("prune-gguf-missing", ["prune", "{T}/none.gguf", "--sparsity", "0.5", "--out", "{T}/o"], r"does not exist"),
    Case("prune-cache-is-a-file", ["prune", "smollm2-135m", "--sparsity", "0.5", "--out", "{T}/o"],
         r"is a file.*SPARSE_RUNTIME_CACHE", setup=write("cache", "x"), env={"SPARSE_RUNTIME_CACHE": "{T}/cache"}),
    Case("prune-cache-under-a-file", ["prune", "smollm2-135m", "--sparsity", "0.5", "--out", "{T}/o"],
         r"is a file.*SPARSE_RUNTIME_CACHE", setup=write("cache", "x"),
         env={"SPARSE_RUNTIME_CACHE": "{T}/cache/sub"}),
    Case("prune-missing-tensor", ["prune", "{T}/ck", "--sparsity", "0.6", "--out", "{T}/o"],
         r"lacks 1 weight tensor.*copy the model again", setup=copy("P", "ck", drop_tensor)),
    Case("prune-plain-model-missing-tensor", ["prune", "{T}/d", "--sparsity", "0.5", "--out", "{T}/o"],
         r"lacks 1 weight tensor.*copy the model again", setup=copy("D", "d", drop_tensor)),
    # ---- prune: bad data -------------------------------------------------------------------------
    Case("prune-c4-corrupt-line", [*PRUNE, "--data-dir", "{T}/data", "--out", "{T}/o"],
         r"c4_sample\.jsonl line 11 .*fix or delete that line", setup=data_dir(c4_lines=['{"text": "ok"', "x"])),
    Case("prune-c4-line-not-object", [*PRUNE, "--data-dir", "{T}/data", "--out", "{T}/o"],
         r"c4_sample\.jsonl line 11 .*string 'text'", setup=data_dir(c4_lines=["[1, 2]"])),
    Case("prune-c4-line-no-text", [*PRUNE, "--data-dir", "{T}/data", "--out", "{T}/o"],
         r"c4_sample\.jsonl line 12 .*string 'text'", setup=data_dir(c4_lines=['{"text": "fine"}', '{"txt": "a"}'])),
    Case("prune-c4-not-utf8", [*PRUNE, "--data-dir", "{T}/data", "--out", "{T}/o"],
         r"c4_sample\.jsonl line 11 is not valid UTF-8", setup=data_dir(c4_lines=[b'{"text": "\xff"}'])),
    Case("prune-c4-missing", [*PRUNE, "--data-dir", "{T}/empty", "--out", "{T}/o"], r"C4", setup=mkdir("empty"),
         env={"SPARSE_RUNTIME_DATA": "{T}/empty"}),
    # ---- prune: manifests of the wrong shape -----------------------------------------------------
    Case("manifest-not-json", ["prune", "{T}/ck", "--sparsity", "0.6", "--out", "{T}/o"], r"not valid JSON.*corrupt",
         setup=copy("P", "ck", lambda d: (d / "sparsity_manifest.json").write_text("{"))),
    Case("manifest-foreign", ["inspect", "{T}/ck"], r"not a sparse-runtime sparsity manifest",
         setup=copy("P", "ck", lambda d: (d / "sparsity_manifest.json").write_text('{"hello": 1}'))),
    Case("manifest-newer-version", ["inspect", "{T}/ck"], r"upgrade sparse-runtime", setup=set_top("version", 99)),
    Case("manifest-version-string", ["inspect", "{T}/ck"], r"'version' must be an integer.*" + MANIFEST_FIX,
         setup=set_top("version", "x")),
    Case("manifest-layers-list", ["inspect", "{T}/ck"], r"'layers' must be an object.*" + MANIFEST_FIX,
         setup=set_top("layers", [])),
    Case("manifest-history-int", ["export", "{T}/ck", "--format", "onnx", "--out", "{T}/o"],
         r"'history' must be a list.*" + MANIFEST_FIX, setup=set_top("history", 5)),
    Case("manifest-extra-list", ["prune", "{T}/ck", "--sparsity", "0.6", "--out", "{T}/o"],
         r"'extra' must be an object", setup=set_top("extra", [1])),
    Case("manifest-versions-string", ["inspect", "{T}/ck"], r"'versions' must be an object", setup=set_top("versions", "x")),
    Case("manifest-base-model-int", ["inspect", "{T}/ck"], r"'base_model' must be a string", setup=set_top("base_model", 5)),
    Case("manifest-nnz-string", ["inspect", "{T}/ck"], r"nnz' must be an integer.*" + MANIFEST_FIX,
         setup=set_layer("nnz", "4096")),
    Case("manifest-nnz-bool", ["inspect", "{T}/ck"], r"nnz' must be an integer", setup=set_layer("nnz", True)),
    Case("manifest-shape-string", ["inspect", "{T}/ck"], r"shape' must be a list", setup=set_layer("shape", "64x128")),
    Case("manifest-shape-floats", ["inspect", "{T}/ck"], r"shape' must be a list of integers",
         setup=set_layer("shape", [64.5, 128])),
    Case("manifest-measured-string", ["inspect", "{T}/ck"], r"measured' must be a number", setup=set_layer("measured", "x")),
    Case("manifest-target-string", ["inspect", "{T}/ck"], r"target' must be a number or null",
         setup=set_layer("target", "half")),
    Case("manifest-structure-int", ["inspect", "{T}/ck"], r"structure' must be a string", setup=set_layer("structure", 4)),
    Case("manifest-digest-int", ["inspect", "{T}/ck"], r"mask_sha256' must be a hex string",
         setup=set_layer("mask_sha256", 5)),
    Case("manifest-record-not-object", ["inspect", "{T}/ck"], r"must be an object",
         setup=manifest_edit(lambda d: d["layers"].__setitem__(LAYER, "x"))),
    Case("manifest-record-unknown-field", ["inspect", "{T}/ck"], r"unknown fields bogus",
         setup=set_layer("bogus", 1)),
    Case("manifest-record-missing-field", ["inspect", "{T}/ck"], r"lacks nnz",
         setup=manifest_edit(lambda d: d["layers"][LAYER].pop("nnz"))),
    Case("manifest-weights-tampered", ["inspect", "{T}/ck"], r"disagrees with the weights",
         setup=copy("P", "ck", tamper_weights)),
    Case("manifest-foreign-layers", ["inspect", "{T}/ck"], r"names layers the model does not have.*--write-manifest",
         setup=manifest_edit(lambda d: d["layers"].__setitem__("model.layers.9.x", d["layers"][LAYER]))),
    Case("manifest-record-deleted", ["inspect", "{T}/ck"], r"accounts for 13 of the model's 14",
         setup=manifest_edit(lambda d: d["layers"].pop(LAYER))),
    Case("manifest-record-deleted-and-tampered", ["export", "{T}/ck", "--format", "onnx", "--out", "{T}/o"],
         r"accounts for 13 of the model's 14", setup=copy("P", "ck", lambda d: (tamper_weights(d), drop_record(d)))),
    # ---- repair ----------------------------------------------------------------------------------
    Case("repair-unknown-method", [*REPAIR, "--method", "obs", "--out", "{T}/o"], r"unknown repair method.*choose"),
    Case("repair-same-sign-bad", [*REPAIR, "--same-sign", "maybe", "--out", "{T}/o"], r"on, off or official"),
    Case("repair-device-cuda", [*REPAIR, "--device", "cuda", "--out", "{T}/o"], r"no CUDA device.*--device cpu"),
    Case("repair-out-exists", [*REPAIR, "--out", "{T}/o"], r"already exists.*--overwrite", setup=mkdir("o")),
    Case("repair-out-is-input", ["repair", "{T}/ck", "--out", "{T}/ck", "--overwrite"], r"is the input",
         setup=copy("P", "ck")),
    Case("repair-dense-model-no-manifest", ["repair", "{D}", "--out", "{T}/o"], r"manifest"),
    Case("repair-dense-missing", [*REPAIR, "--dense", "{T}/nope", "--out", "{T}/o"], r"does not exist"),
    Case("repair-json-dir-missing", [*REPAIR, "--out", "{T}/o", "--json", "{T}/no/r.json"], r"does not exist.*create it"),
    Case("repair-negative-threshold", [*REPAIR, "--threshold", "-1", "--out", "{T}/o"], r"threshold"),
    # ---- export ----------------------------------------------------------------------------------
    Case("export-unknown-format", ["export", "{P}", "--format", "tflite", "--out", "{T}/o"], r"unknown export format.*choose"),
    Case("export-option-no-equals", [*EXPORT, "-o", "opset", "--out", "{T}/o"], r"KEY=VALUE"),
    Case("export-unknown-option", [*EXPORT, "-o", "bogus=1", "--out", "{T}/o"], r"bogus"),
    Case("export-out-exists", [*EXPORT, "--out", "{T}/o"], r"already exists.*--overwrite", setup=mkdir("o")),
    Case("export-out-is-input-overwrite", ["export", "{T}/ck", "--format", "onnx", "--out", "{T}/ck", "--overwrite"],
         r"is the input.*choose another --out", setup=copy("P", "ck")),
    Case("export-out-inside-input", ["export", "{T}/ck", "--format", "onnx", "--out", "{T}/ck/onnx"],
         r"is the input.*choose another --out", setup=copy("P", "ck")),
    Case("export-out-holds-input", ["export", "{T}/w/ck", "--format", "onnx", "--out", "{T}/w", "--overwrite"],
         r"is the input.*choose another --out", setup=lambda w, T: shutil.copytree(w.P, T / "w" / "ck")),
    Case("export-model-missing", ["export", "{T}/nope", "--format", "onnx", "--out", "{T}/o"], r"does not exist"),
    Case("export-semi-structured-of-unstructured", ["export", "{P}", "--format", "semi-structured", "--out", "{T}/o"],
         r"2:4"),
    Case("export-out-dot", [*EXPORT, "--out", ".", "--overwrite"], r"current directory", cwd="{T}"),
    # ---- finetune / seft --------------------------------------------------------------------
    Case("finetune-rank-too-large", [*LORS, "--rank", "999", "--out", "{T}/o"], r"rank"),
    Case("finetune-model-missing", ["finetune", "{T}/nope", *FT, "--out", "{T}/o"], r"does not exist"),
    Case("finetune-data-path-missing", [*LORS[:-2 - len(FT)], "--data", "alpaca", "--data-path", "{T}/no.json",
                                        "--out", "{T}/o"], r"does not exist"),
    Case("finetune-alpaca-corrupt-json", ["finetune", "{P}", "--data", "alpaca", "--data-path", "{T}/a.json",
                                          "--steps", "1", "--out", "{T}/o"], r"a\.json line 3 column \d+ is not valid JSON",
         setup=write("a.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction" "x"}\n]')),
    Case("finetune-alpaca-record-wrong-type", ["finetune", "{P}", "--data", "alpaca", "--data-path", "{T}/a.json",
                                               "--steps", "1", "--out", "{T}/o"], r"a\.json record 1 .*fix or delete",
         setup=write("a.json", json.dumps([{"instruction": "a", "output": "b"}, {"instruction": 1, "output": "b"}]))),
    Case("finetune-alpaca-shared-corrupt", ["finetune", "{P}", "--data", "alpaca", "--data-dir", "{T}/data",
                                            "--steps", "1", "--out", "{T}/o"], r"alpaca_5000\.json line 1 column",
         setup=data_dir(alpaca='[{"instruction": ')),
    Case("finetune-c4-corrupt-line", [*LORS, "--data-dir", "{T}/data", "--out", "{T}/o"], r"line 11",
         setup=data_dir(c4_lines=["{"])),
    Case("finetune-c4-with-data-path", [*LORS, "--data-path", "{T}/x.txt", "--out", "{T}/o"],
         r"--data-path does not apply to --data c4.*drop --data-path", setup=write("x.txt", "some text")),
    Case("finetune-resume-foreign-out", [*LORS, "--resume", "--out", "{T}/o"], r"nothing to resume.*--overwrite",
         setup=mkdir("o")),
    Case("finetune-device-cuda", [*LORS, "--device", "cuda", "--out", "{T}/o"], r"no CUDA device"),
    Case("finetune-out-exists", [*LORS, "--out", "{T}/o"], r"already exists.*--overwrite", setup=mkdir("o")),
    Case("finetune-overwrite-typo-keeps-old", ["finetune", "{T}/nope", *FT, "--out", "{T}/o", "--overwrite"],
         r"does not exist", setup=mkdir("o")),
    Case("finetune-overwrite-corrupt-data-keeps-old", [*LORS, "--data-dir", "{T}/data", "--out", "{T}/o",
                                                       "--overwrite"], r"line 11",
         setup=lambda w, T: (mkdir("o")(w, T), data_dir(c4_lines=["{"])(w, T))),
    Case("finetune-out-is-input", ["finetune", "{T}/ck", *FT, "--out", "{T}/ck", "--overwrite"],
         r"input|choose another --out", setup=copy("P", "ck")),
    Case("finetune-out-inside-input", ["finetune", "{T}/ck", *FT, "--out", "{T}/ck/ad"],
         r"input|choose another --out", setup=copy("P", "ck")),
    Case("seft-out-is-input", ["finetune", "{T}/ck", "--method", "seft", *FT, "--out", "{T}/ck", "--overwrite"],
         r"input|choose another --out", setup=copy("P", "ck")),
    Case("seft-overwrite-typo-keeps-old", ["finetune", "{T}/nope", "--method", "seft", *FT, "--out", "{T}/o", "--overwrite"],
         r"does not exist", setup=mkdir("o")),
    Case("seft-update-every-zero", [*SEFT, "--update-every", "0", "--out", "{T}/o"], r"update"),
    Case("seft-model-missing", ["finetune", "{T}/nope", "--method", "seft", *FT, "--out", "{T}/o"], r"does not exist"),
    Case("seft-device-cuda", [*SEFT, "--device", "cuda", "--out", "{T}/o"], r"no CUDA device"),
    # ---- losa ------------------------------------------------------------------------------------
    Case("losa-sparsity-above-1", [*LOSA, "--sparsity", "1.5", "--out", "{T}/o"], r"\[0, 1\)|sparsity"),
    Case("losa-device-cuda", [*LOSA, "--device", "cuda", "--out", "{T}/o"], r"no CUDA device"),
    Case("losa-out-dot", [*LOSA, "--out", ".", "--overwrite"], r"current directory", cwd="{T}"),
    Case("losa-out-exists", [*LOSA, "--out", "{T}/o"], r"already exists.*--overwrite", setup=mkdir("o")),
    Case("losa-c4-corrupt-line", [*LOSA, "--data-dir", "{T}/data", "--out", "{T}/o"], r"c4_sample\.jsonl line 11",
         setup=data_dir(c4_lines=["{"])),
    Case("losa-model-missing", ["finetune", "{T}/nope", "--method", "losa", "--sparsity", "0.5", "--out", "{T}/o"], r"does not exist"),
    # ---- merge -----------------------------------------------------------------------------------
    Case("merge-not-an-adapter", ["merge", "{P}", "--out", "{T}/o"], r"not a sparse-runtime adapter"),
    Case("merge-adapter-config-corrupt", ["merge", "{T}/ad", "--out", "{T}/o"], r"not valid JSON",
         setup=copy("A", "ad", lambda d: (d / "adapter_config.json").write_text("{"))),
    Case("merge-base-missing", [*MERGE, "--base", "{T}/nope", "--out", "{T}/o"], r"does not exist"),
    Case("merge-other-base", [*MERGE, "--base", "{D}", "--out", "{T}/o"], r"mask|fingerprint|base"),
    Case("merge-out-exists", [*MERGE, "--out", "{T}/o"], r"already exists.*--overwrite", setup=mkdir("o")),
    Case("merge-out-is-adapter", ["merge", "{T}/ad", "--out", "{T}/ad", "--overwrite"], r"is the input",
         setup=copy("A", "ad")),
    Case("merge-out-is-base", [*MERGE, "--base", "{T}/ck", "--out", "{T}/ck", "--overwrite"], r"is the input",
         setup=copy("P", "ck")),
    # ---- eval ------------------------------------------------------------------------------------
    Case("eval-unknown-task", ["eval", "tiny-llama", "--zeroshot", "mmlu"], r"unknown.*task"),
    Case("eval-limit-zero", ["eval", "tiny-llama", "--zeroshot", "boolq", "--limit", "0"], r"positive"),
    Case("eval-unknown-protocol", ["eval", "tiny-llama", "--protocol", "fast"], r"unknown protocol"),
    Case("eval-device-cuda", ["eval", "tiny-llama", "--device", "cuda"], r"no CUDA device"),
    Case("eval-json-dir-missing", ["eval", "tiny-llama", "--json", "{T}/no/r.json"], r"does not exist.*create it"),
    Case("eval-json-is-dir", ["eval", "tiny-llama", "--json", "{T}/d"], r"is a directory.*file name", setup=mkdir("d")),
    Case("eval-wikitext-missing", ["eval", "tiny-llama", "--protocol", "test", "--data-dir", "{T}/empty"],
         r"WikiText", setup=mkdir("empty"), env={"SPARSE_RUNTIME_DATA": "{T}/empty"}),
    Case("eval-manifest-corrupt", ["eval", "{T}/ck", "--protocol", "test"], r"nnz' must be an integer",
         setup=set_layer("nnz", "x")),
    # ---- inspect ---------------------------------------------------------------------------------
    Case("inspect-missing", ["inspect", "{T}/nope"], r"does not exist"),
    Case("inspect-gguf-not-gguf", ["inspect", "{T}/bad.gguf"], r"not a GGUF file", setup=write("bad.gguf", "GGUX")),
    Case("inspect-gguf-empty", ["inspect", "{T}/e.gguf"], r"not a GGUF file", setup=write("e.gguf", b"")),
    Case("inspect-gguf-truncated", ["inspect", "{T}/t.gguf"], r"damaged or truncated", setup=gguf_truncated),
    Case("inspect-json-is-dir", ["inspect", "tiny-llama", "--json", "{T}/d"], r"is a directory", setup=mkdir("d")),
    Case("inspect-write-manifest-not-dir", ["inspect", "tiny-llama", "--write-manifest"], r"needs a checkpoint directory"),
    # ---- generate --------------------------------------------------------------------------------
    *[Case(f"generate-empty-prompt-{eng}", ["generate", "{O}" if eng.startswith("ort") else "{P}", "--engine", eng,
                                            "--prompt", ""], r"prompt is empty.*give --prompt")
      for eng in ("torch-cpu", "torch-sparse", "sparse-cpu", "lean-cpu", "ort-cpu", "ort-sparse", "deepsparse")],
    Case("generate-empty-prompt-chat", ["generate", "{P}", "--engine", "torch-cpu", "--prompt", "", "--chat"],
         r"prompt is empty.*give --prompt"),
    Case("generate-torch-cuda-24-without-cuda", ["generate", "{P}", "--engine", "torch-cuda-24", "--prompt", "hi"],
         r"CUDA|cuda"),
    Case("generate-unknown-engine", ["generate", "{P}", "--engine", "vllm", "--prompt", "hi"], r"unknown engine.*choose"),
    Case("generate-model-missing", ["generate", "{T}/nope", "--prompt", "hi"], r"does not exist"),
    Case("generate-prompt-too-long", ["generate", "{P}", "--prompt", "x" * 600, "--max-new-tokens", "4"],
         r"context.*shorten the prompt"),
    Case("generate-negative-new-tokens", ["generate", "{P}", "--prompt", "hi", "--max-new-tokens", "-3"],
         r"max-new-tokens"),
    # ---- bench -----------------------------------------------------------------------------------
    Case("bench-unknown-engine", ["bench", "tiny-llama", "{P}", "--engines", "vllm", "--out", "{T}/b"], r"unknown engine"),
    Case("bench-impossible-scenario", ["bench", "tiny-llama", "{P}", "--engines", "torch-cpu", "--scenarios",
                                       "prefill:0x8", "--out", "{T}/b"], r"scenario|prefill"),
    Case("bench-negative-decode", ["bench", "tiny-llama", "{P}", "--engines", "torch-cpu", "--scenarios",
                                   "decode:1@-4", "--out", "{T}/b"], r"scenario|decode"),
    Case("bench-repeats-too-few", ["bench", "tiny-llama", "{P}", "--engines", "torch-cpu", "--repeats", "1",
                                   "--out", "{T}/b"], r"repeats"),
    Case("bench-existing-results-kept", ["bench", "tiny-llama", "{P}", "--engines", "torch-cpu", "--scenarios",
                                         "decode:1@4", "--repeats", "5", "--out", "{T}/b"], r"--overwrite",
         setup=lambda w, T: (mkdir("b")(w, T), (T / "b" / "latency.json").write_text("{}"),
                             (T / "b" / "latency.md").write_text("old"))),
    # ---- run (recipes) ---------------------------------------------------------------------------
    Case("run-recipe-missing", ["run", "{T}/nope.yaml", "--workdir", "{T}/w"], r"does not exist"),
    Case("run-recipe-not-mapping", ["run", "{T}/r.yaml", "--workdir", "{T}/w"], r"a recipe is a mapping",
         setup=recipe("- 1\n- 2\n")),
    Case("run-recipe-bad-yaml", ["run", "{T}/r.yaml", "--workdir", "{T}/w"], r"r\.yaml", setup=recipe("a: [\n")),
    Case("run-recipe-python-tag", ["run", "{T}/r.yaml", "--workdir", "{T}/w"], r"r\.yaml",
         setup=recipe("name: x\nmodel: !!python/object/apply:os.system ['touch PWNED']\nsteps: []\n")),
    Case("run-unknown-stage", ["run", "{T}/r.yaml", "--workdir", "{T}/w"], r"unknown recipe stage",
         setup=recipe("name: x\nmodel: tiny-llama\nsteps:\n  - stage: nope\n")),
    Case("run-unknown-option", ["run", "{T}/r.yaml", "--workdir", "{T}/w"], r"unknown option",
         setup=recipe("name: x\nmodel: tiny-llama\nsteps:\n  - stage: evaluate\n    bogus: 1\n")),
    Case("run-export-before-prune", ["run", "{T}/r.yaml", "--workdir", "{T}/w"], r"export|prune",
         setup=recipe("name: x\nmodel: tiny-llama\nprotocol: test\nsteps:\n  - stage: export\n    format: onnx\n"
                      "  - stage: prune\n    sparsity: 0.5\n")),
    Case("run-workdir-is-a-file", ["run", "{T}/r.yaml", "--workdir", "{T}/f"], r"is a file|not a directory",
         setup=lambda w, T: (recipe("name: x\nmodel: tiny-llama\nsteps:\n  - stage: load\n")(w, T),
                             write("f", "x")(w, T))),
    # ---- engines ---------------------------------------------------------------------------------
    Case("engines-install-unknown", ["engines", "install", "vllm"], r"unknown engine.*choose"),
    Case("engines-install-onnxruntime", ["engines", "install", "onnxruntime"], r"pip install"),
    Case("engines-install-deepsparse-bad-python", ["engines", "install", "deepsparse", "--python", "{T}/nope/python",
                                                   "--force"], r"python|Python",
         env={"SPARSE_RUNTIME_CACHE": "{T}/cache"}),
    Case("engines-no-action", ["engines"], r"required"),
    # ---- the top level ---------------------------------------------------------------------------
    Case("cli-unknown-command", ["polish", "x"], r"invalid choice"),
    Case("cli-no-command", [], r"required"),
]
