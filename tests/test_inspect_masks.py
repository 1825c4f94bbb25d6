"""The masks file (sparse_runtime/masks_file.py): every checkpoint writer writes it, ``inspect``
reads it instead of the weights when the weight files' fingerprints are unchanged and then reports
exactly what the weight scan reports; a changed or missing file sends it back to the weights,
saying why; ``--verify`` scans the weights and catches a masks file that disagrees with them."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import sparse_runtime as sr
from sparse_runtime.cli import main
from sparse_runtime.inspect import inspect_directory, scan_packed, scan_rows
from sparse_runtime.masks_file import MASKS_NAME, MasksWriter, pack_keep
from sparse_runtime.sparsity import NMPattern, mask_digest, nm_prune_mask

from helpers import mixed_pruned

FAST = "verified against the masks file (shards unchanged since written; --verify scans the weights)"


def _facts(found):
    return ({n: (s.shape, s.nnz, s.digest, s.nm) for n, s in found.scans.items()}, found.report.rows(),
            found.report.nm_all)


def test_scan_packed_equals_scan_rows():
    """Read off packed bytes cut anywhere, the answers are the weight scan's (odd M included)."""
    rng = np.random.default_rng(1)
    pats = ["2:4", "4:8", "1:3", "8:16", "12:24", "1:2"]
    for shape in [(5, 12), (7, 13), (16, 24), (3, 48), (9, 8)]:
        for s in (0.0, 0.5, 0.9):
            w = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
            w[torch.rand(shape) < s] = 0
            if s == 0.5 and shape[1] % 24 == 0:  # a weight that keeps every pattern
                w = w * nm_prune_mask(w.abs(), NMPattern(2, 4)) * nm_prune_mask(w.abs(), NMPattern(1, 3))
            want = scan_rows([(w != 0).numpy().reshape(-1)], shape, pats, digest=True)
            assert want[1] == mask_digest(w != 0)
            packed = pack_keep(w)
            for cut in (1, 2, 3, 5, 64):
                pieces = [packed[i:i + cut] for i in range(0, packed.size, cut)]
                assert scan_packed(pieces, shape, pats, digest=True) == want, (shape, s, cut)


@pytest.mark.parametrize("family,dtype,shard", [("llama", torch.float32, None), ("qwen2", torch.bfloat16, "20KB")])
def test_fast_path_reports_what_the_scan_reports(tmp_path, family, dtype, shard, capsys):
    lm, man = mixed_pruned(family, dtype)
    if shard:  # a sharded checkpoint (an index) written by save_pretrained, then the masks file
        with sr.manifest.atomic_directory(tmp_path / "ck") as tmp:
            lm.model.save_pretrained(tmp, safe_serialization=True, max_shard_size=shard)
            (tmp / "sparsity_manifest.json").write_text(json.dumps(man.to_json()))
            from sparse_runtime.masks_file import write_masks_of_model

            write_masks_of_model(tmp, lm.model)
        assert (tmp_path / "ck" / "model.safetensors.index.json").is_file()
    else:
        sr.save_checkpoint(lm.model, lm.tokenizer, tmp_path / "ck", man)
    assert (tmp_path / "ck" / MASKS_NAME).is_file()
    read = []
    fast = inspect_directory(tmp_path / "ck", tensor_read=read.append)
    assert fast.from_masks and not read  # no weight was read
    full = inspect_directory(tmp_path / "ck", full_scan=True)
    assert not full.from_masks and full.masks_file_matches
    assert _facts(fast) == _facts(full)
    assert {n: s.digest for n, s in fast.scans.items()} == {n: r.mask_sha256 for n, r in man.layers.items()}
    assert main(["inspect", str(tmp_path / "ck"), "--json", str(tmp_path / "f.json")]) == 0
    out = capsys.readouterr().out
    assert f"sparsity manifest: {FAST}" in out
    assert main(["inspect", str(tmp_path / "ck"), "--verify", "--json", str(tmp_path / "v.json")]) == 0
    assert "weights scanned, --verify; the masks file matches them" in capsys.readouterr().out
    assert json.loads((tmp_path / "f.json").read_text()) == json.loads((tmp_path / "v.json").read_text())
    # the masks file is a plain safetensors file of packed keep-masks
    from safetensors.numpy import load_file

    name, lin = next(iter(lm.family.iter_linears(lm.model)))
    got = load_file(str(tmp_path / "ck" / MASKS_NAME))[name + ".mask"]
    assert got.dtype == np.uint8 and np.array_equal(got.reshape(-1), np.packbits((lin.weight != 0).numpy()))
    # ... and no reader takes it for weights
    assert sr.load_model(tmp_path / "ck").manifest is not None


def test_changed_or_missing_masks_fall_back_to_the_weights(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    lm, man = mixed_pruned()
    ck = tmp_path / "ck"
    sr.save_checkpoint(lm.model, lm.tokenizer, ck, man)
    f = ck / "model.safetensors"

    def manifest_line(*extra):
        assert main(["inspect", str(ck), "--summary", *extra]) == 0
        return capsys.readouterr().out.split("sparsity manifest: ")[1].strip()

    assert manifest_line() == FAST
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: the weights could differ
    read = []
    got = inspect_directory(ck, tensor_read=read.append)
    assert not got.from_masks and len(read) == 14
    assert got.masks_note == "model.safetensors changed since the masks file was written (modification time)"
    assert manifest_line() == f"verified (weights scanned: {got.masks_note})"
    # --write-manifest rewrites the masks file with fresh fingerprints: fast again
    assert main(["inspect", str(ck), "--summary", "--write-manifest"]) == 0
    capsys.readouterr()
    assert manifest_line() == FAST
    # the masks file deleted, corrupt, or disagreeing with the manifest: the weights are scanned
    masks = (ck / MASKS_NAME).read_bytes()
    (ck / MASKS_NAME).unlink()
    assert manifest_line() == "verified (weights scanned: no masks file)"
    (ck / MASKS_NAME).write_bytes(masks[: len(masks) - 10])
    assert manifest_line().startswith("verified (weights scanned: the masks file is unusable (")
    bad = bytearray(masks)
    bad[-1] ^= 0xFF  # the last layer's last byte
    (ck / MASKS_NAME).write_bytes(bytes(bad))
    assert manifest_line() == "verified (weights scanned: the masks file disagrees with the manifest)"
    # a weight rewritten (same count, another mask): scanned, and the manifest check fails as before
    (ck / MASKS_NAME).write_bytes(masks)
    sd = load_file(str(f))
    w = sd["model.layers.1.mlp.down_proj.weight"]
    i = int((w[0] == 0).nonzero()[0])
    j = int((w[0] != 0).nonzero()[0])
    w[0, i], w[0, j] = 0.5, 0.0
    save_file(sd, str(f), metadata={"format": "pt"})
    assert main(["inspect", str(ck), "--summary"]) == 2
    assert "disagrees with the weights" in capsys.readouterr().err


def test_verify_catches_a_masks_file_that_disagrees_with_the_weights(tmp_path, capsys):
    """The manifest agrees with the weights, the masks file does not (its fingerprints are fresh):
    the fast path refuses it (it disagrees with the manifest), ``--verify`` fails loudly."""
    lm, man = mixed_pruned()
    ck = tmp_path / "ck"
    sr.save_checkpoint(lm.model, lm.tokenizer, ck, man)
    w = MasksWriter(ck)
    linears = list(lm.family.iter_linears(lm.model))
    for i, (name, lin) in enumerate(linears):
        keep = (lin.weight != 0).clone()
        if i == 5:
            keep[0, 0] = ~keep[0, 0]
        w.add(name, keep)
    w.close()
    got = inspect_directory(ck)
    assert not got.from_masks and got.masks_note == "the masks file disagrees with the manifest"
    assert main(["inspect", str(ck), "--summary", "--verify"]) == 2
    err = capsys.readouterr().err
    assert f"sparsity_masks.st disagrees with the weights in 1 layer(s) ({linears[5][0]})" in err
    assert "--write-manifest" in err
    assert main(["inspect", str(ck), "--summary", "--verify", "--trust-manifest"]) == 2
    assert "pass one of the two" in capsys.readouterr().err


def test_every_checkpoint_writer_writes_the_masks_file(tmp_path, monkeypatch, capsys):
    """``prune`` (in memory and streamed, sharded), and so every verb that saves through
    ``save_checkpoint``; the streamed writer appends each mask as its block is written."""
    from sparse_runtime.models import streaming
    from sparse_runtime.models.streaming import ShardWriter
    from sparse_runtime.models.tiny import tiny_model
    from sparse_runtime.prune import PruneConfig, prune_checkpoint

    src = tmp_path / "dense"
    tiny_model("llama", num_hidden_layers=3).save_pretrained(src, safe_serialization=True)
    monkeypatch.setattr(streaming, "DEFAULT_SHARD_BYTES", 50_000)
    monkeypatch.setattr(ShardWriter.__init__, "__defaults__", (50_000, None, "model"))
    events = []
    real_add, real_shard_add = MasksWriter.add, ShardWriter.add
    monkeypatch.setattr(MasksWriter, "add", lambda self, layer, t: (events.append(("mask", layer, self._f.tell())),
                                                                      real_add(self, layer, t))[1])
    monkeypatch.setattr(ShardWriter, "add", lambda self, name, t: (events.append(("shard", name, 0)),
                                                                    real_shard_add(self, name, t))[1])
    cfg = PruneConfig(protocol="test", method="wanda", sparsity=0.6)
    for mode in ("off", "on"):
        events.clear()
        prune_checkpoint(str(src), cfg, tmp_path / mode, stream=mode, plot=False)
        assert (tmp_path / mode / MASKS_NAME).is_file()
    assert (tmp_path / "on" / "model.safetensors.index.json").is_file()
    streamed = list(events)
    masks = [e for e in streamed if e[0] == "mask"]
    assert len(masks) == 21 and [m[2] for m in masks] == sorted(m[2] for m in masks) and masks[-1][2] > 0
    # block 0's masks went to the file before block 2 reached the shard writer: never all held
    first_mask = streamed.index(masks[0])
    assert any(e[0] == "shard" and e[1].startswith("model.layers.2.") for e in streamed[first_mask:])
    a, b = inspect_directory(tmp_path / "off"), inspect_directory(tmp_path / "on")
    assert a.from_masks and b.from_masks and _facts(a) == _facts(b)
    assert _facts(b) == _facts(inspect_directory(tmp_path / "on", full_scan=True))


def test_group_check_equals_the_byte_table():
    """The word-at-a-time N:M check (``_group_ok``) answers as a table of every byte does."""
    from sparse_runtime.inspect import _byte_ok_table, _group_ok

    rng = np.random.default_rng(2)
    for text in ("1:2", "1:4", "2:4", "3:4", "1:8", "4:8", "7:8"):
        p = NMPattern.parse(text)
        table = _byte_ok_table(p)
        good = np.flatnonzero(table).astype(np.uint8)
        for n in (1, 7, 8, 9, 64, 1001):
            ok_bytes = rng.choice(good, n)
            assert _group_ok(ok_bytes, p)
            for at in {0, n // 2, n - 1}:  # one bad byte anywhere, the tail included
                bad = ok_bytes.copy()
                bad[at] = rng.choice(np.flatnonzero(~table))
                assert not _group_ok(bad, p), (text, n, at)
        every = np.arange(256, dtype=np.uint8)
        assert [_group_ok(every[i:i + 1], p) for i in range(256)] == table.tolist()
