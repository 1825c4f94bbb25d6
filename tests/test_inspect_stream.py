"""``inspect`` of a directory reads headers and one weight at a time (sparse_runtime/inspect.py):
its answers equal the in-memory path's, a manifest that disagrees with the tensors never passes,
and ``--write-manifest`` writes what ``build_manifest`` would."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import sparse_runtime as sr
from sparse_runtime.cli import main
from sparse_runtime.inspect import inspect_directory, inspect_sparsity, scan_rows
from sparse_runtime.sparsity import NMPattern, mask_digest, nm_compliant

from helpers import mixed_pruned, tiny_pruned


def test_scan_equals_the_reference_on_odd_shapes():
    rng = np.random.default_rng(0)
    pats = ["2:4", "4:8", "1:3", "8:16", "1:2"]
    for shape in [(5, 12), (7, 13), (16, 24), (3, 64), (9, 8)]:
        for s in (0.0, 0.5, 0.9):
            w = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
            w[torch.rand(shape) < s] = 0
            w[0, 0] = -0.0  # a negative zero is a zero
            flat = (w != 0).numpy().reshape(-1)
            for rows in (1, 2, 3):  # chunks of whole rows; bits carry over between them
                chunks = [flat[i * shape[1]:(i + rows) * shape[1]] for i in range(0, shape[0], rows)]
                nnz, digest, ok = scan_rows(chunks, shape, pats, digest=True)
                assert nnz == int((w != 0).sum()) and digest == mask_digest(w != 0)
                assert ok == [p for p in pats if nm_compliant(w, NMPattern.parse(p))]


@pytest.mark.parametrize("family,dtype,shard", [("llama", "float32", None), ("qwen2", "bfloat16", "20KB"),
                                                ("mistral", "float16", None)])
def test_directory_equals_in_memory(tmp_path, family, dtype, shard):
    lm, man = mixed_pruned(family)
    lm.model.to(getattr(torch, dtype))
    want = inspect_sparsity(lm.model, lm.family)
    kw = {"max_shard_size": shard} if shard else {}
    with sr.manifest.atomic_directory(tmp_path / "ck") as tmp:
        lm.model.save_pretrained(tmp, safe_serialization=True, **kw)
        (tmp / "sparsity_manifest.json").write_text(json.dumps(man.to_json()))
    assert shard is None or (tmp_path / "ck" / "model.safetensors.index.json").is_file()
    read = []
    got = inspect_directory(tmp_path / "ck", chunk_elems=100, tensor_read=read.append)  # many chunks per weight
    assert got.report.rows() == want.rows() and got.report.nm_all == want.nm_all
    assert read == [n for n, _ in lm.family.iter_linears(lm.model)]  # one weight at a time, each once
    assert {n: s.digest for n, s in got.scans.items()} == {n: r.mask_sha256 for n, r in man.layers.items()}


def test_cli_directory_output_equals_the_in_memory_report(tmp_path, capsys):
    lm, man = tiny_pruned("llama", "2:4")
    sr.save_checkpoint(lm.model, lm.tokenizer, tmp_path / "ck", man)
    assert main(["inspect", str(tmp_path / "ck"), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "N:M compliant everywhere: 2:4, 4:8" in out and "sparsity manifest: verified" in out
    rep = inspect_sparsity(lm.model, lm.family)
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["layers"] == rep.rows() and got["total"] == pytest.approx(rep.total) and got["nm_all"] == rep.nm_all


def test_a_wrong_manifest_never_passes(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    lm, man = mixed_pruned()
    sr.save_checkpoint(lm.model, lm.tokenizer, tmp_path / "ck", man)
    f = tmp_path / "ck" / "model.safetensors"
    sd = load_file(str(f))
    w = sd["model.layers.1.mlp.down_proj.weight"]
    w[0, 0], w[0, 1] = 0.0, 0.5  # same count, another mask
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(sr.ManifestError, match="disagrees with the weights.*down_proj"):
        inspect_directory(tmp_path / "ck")
    assert main(["inspect", str(tmp_path / "ck")]) == 2
    assert "disagrees with the weights" in capsys.readouterr().err
    # --trust-manifest reports the record without reading a weight, and says so
    read = []
    got = inspect_directory(tmp_path / "ck", trust_manifest=True, tensor_read=read.append)
    assert not read and got.from_manifest
    assert got.report.total == pytest.approx(man.total_measured)
    assert main(["inspect", str(tmp_path / "ck"), "--summary", "--trust-manifest"]) == 0
    assert "weights not scanned" in capsys.readouterr().out


def test_trust_manifest_reports_the_implied_patterns(tmp_path):
    lm, man = tiny_pruned("llama", "2:4")
    sr.save_checkpoint(lm.model, lm.tokenizer, tmp_path / "ck", man)
    got = inspect_directory(tmp_path / "ck", trust_manifest=True)
    assert got.report.nm_all == ["2:4", "4:8"]  # 2:4 guarantees 4:8
    plain = tmp_path / "plain"
    sr.load_model("tiny-llama").model.save_pretrained(plain, safe_serialization=True)
    with pytest.raises(sr.ManifestError, match="no sparsity manifest.*drop the flag"):
        inspect_directory(plain, trust_manifest=True)


def test_write_manifest_equals_build_manifest(tmp_path, capsys):
    lm, man = mixed_pruned()
    sr.save_checkpoint(lm.model, lm.tokenizer, tmp_path / "ck", man)
    p = tmp_path / "ck" / "sparsity_manifest.json"
    p.unlink()
    assert main(["inspect", str(tmp_path / "ck"), "--summary", "--write-manifest"]) == 0
    assert "manifest: verified" in capsys.readouterr().out
    fixed = json.loads(p.read_text())["layers"]
    want = sr.build_manifest(lm.model, lm.family).to_json()["layers"]  # no previous manifest: unstructured
    keys = ("mask_sha256", "nnz", "shape", "measured", "structure")
    assert {n: [r[k] for k in keys] for n, r in fixed.items()} == {n: [r[k] for k in keys] for n, r in want.items()}
    assert sr.load_model(tmp_path / "ck").manifest is not None  # the loader verifies what was written


def test_missing_and_truncated_tensors_are_one_line(tmp_path, capsys):
    lm = sr.load_model("tiny-llama")
    lm.model.save_pretrained(tmp_path / "d", safe_serialization=True)
    f = tmp_path / "d" / "model.safetensors"
    shutil.copytree(tmp_path / "d", tmp_path / "t")
    data = f.read_bytes()
    (tmp_path / "t" / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["inspect", str(tmp_path / "t")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    from safetensors.torch import load_file, save_file

    sd = load_file(str(f))
    del sd["model.layers.1.self_attn.o_proj.weight"]
    save_file(sd, str(f), metadata={"format": "pt"})
    assert main(["inspect", str(tmp_path / "d")]) == 2
    assert "lacks 1 weight tensor" in capsys.readouterr().err


@pytest.mark.parametrize("shape,layers,last", [
    ("smollm2-135m", 2, (576, 1536)),
    pytest.param("llama-2-7b", 1, (4096, 11008), marks=pytest.mark.slow),  # 0.9 GB written
])
def test_real_shape_slice(tmp_path, shape, layers, last):
    """A depth slice of a real shape, stored in bf16 in several shards, scanned in chunks."""
    from sparse_runtime.models.synthetic import write_synthetic

    out = write_synthetic(shape, tmp_path / "m", dtype="bfloat16", layers=layers, tokenizer=None,
                          max_shard_bytes="40MB")
    assert (out / "model.safetensors.index.json").is_file()
    got = inspect_directory(out)
    assert len(got.report.layers) == 7 * layers and got.report.layers[-1].shape == last
    assert got.report.total < 1e-6 and got.report.nm_all == [] and got.manifest is None  # dense (a rare exact 0)


def test_bitmask_export_is_read_from_its_masks(tmp_path, capsys):
    """A bitmask export is inspected from its 1-bit masks; the stored value count and the export
    manifest's mask digest are checked, so a changed mask never passes."""
    from safetensors.torch import load_file, save_file

    lm, man = mixed_pruned()
    sr.save_checkpoint(lm.model, lm.tokenizer, tmp_path / "ck", man)
    assert main(["export", str(tmp_path / "ck"), "--format", "bitmask", "--out", str(tmp_path / "ex")]) == 0
    capsys.readouterr()
    got = inspect_directory(tmp_path / "ex")
    assert got.report.rows() == inspect_sparsity(lm.model, lm.family).rows()
    assert got.bitmask_layers == 13 and got.export_masks_verified  # the dense layer is stored dense
    f = next((tmp_path / "ex").glob("model.bitmask*.safetensors"))
    key = "model.layers.0.mlp.down_proj.bitmask"
    sd = load_file(str(f))
    flat = sd[key].view(-1)
    at = next(i for i, x in enumerate(flat.tolist()) if 0 < bin(x).count("1") < 8)
    ones = bin(int(flat[at])).count("1")
    other = next(x for x in range(256) if bin(x).count("1") == ones and x != int(flat[at]))
    for value, pattern in [(int(flat[at]) ^ 1, "ones in its bitmask but"),  # one weight more or less
                           (other, "records other masks")]:  # same count, another mask
        bad = dict(sd)
        bad[key] = sd[key].clone()
        bad[key].view(-1)[at] = value
        save_file(bad, str(f), metadata={"format": "pt"})
        with pytest.raises((sr.ManifestError, sr.errors.ModelLoadError), match=pattern):
            inspect_directory(tmp_path / "ex")
