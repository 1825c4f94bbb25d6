"""2:4 pack/unpack and bitmask compress/decompress against plain reference computations."""
import numpy as np
import pytest
import torch

from exporters.bitmask import (bitmask_compress, bitmask_decompress, compressed_bytes, decompress_state_dict,
                               pack_bitmask, unpack_bitmask)
from exporters.semi_structured import Not24Error, check_24, pack_24, pick_backend, unpack_24


def random_24(rows=64, cols=128, dtype=torch.float32, seed=0, fewer=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool)
    idx = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1)[..., :2]
    keep.scatter_(-1, idx, True)
    if fewer:  # some groups with 1 or 0 nonzeros
        keep[:, ::3, :] &= torch.rand(rows, keep[:, ::3].shape[1], 4, generator=g) > 0.5
    return w * keep.reshape(rows, cols).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fewer", [False, True])
def test_pack_unpack_24_exact(dtype, fewer):
    w = random_24(dtype=dtype, fewer=fewer)
    values, meta = pack_24(w)
    assert values.shape == (64, 64) and meta.shape == (64, 16) and meta.dtype == torch.uint8
    back = unpack_24(values, meta, w.shape)
    assert torch.equal(back, w)


def test_pack_24_values_match_reference_and_cutlass():
    w = random_24(dtype=torch.float16, seed=3)
    values, meta = pack_24(w)
    # plain reference: the nonzeros of every row, in column order
    ref = torch.stack([row[row != 0] for row in w])
    assert torch.equal(values, ref)
    # the metadata nibble of group 0 of row 0 names its two columns
    cols = (w[0, :4] != 0).nonzero().flatten().tolist()
    assert int(meta[0, 0]) & 0xF == cols[0] | (cols[1] << 2)
    conv = pytest.importorskip("torch.sparse._semi_structured_conversions")
    sparse, _meta = conv.sparse_semi_structured_from_dense_cutlass(w)
    assert torch.equal(values, sparse)  # our values are exactly CUTLASS's packed half


def test_odd_group_count_and_minus_zero():
    w = random_24(rows=8, cols=12)  # 3 groups per row: meta padded to 2 bytes
    w[0, 0] = -0.0
    values, meta = pack_24(w)
    assert meta.shape == (8, 2)
    assert torch.equal(unpack_24(values, meta, w.shape), w)  # -0.0 == 0.0


def test_not_24_refused_with_clear_error():
    w = random_24()
    w[5, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(Not24Error, match=r"layer\.x is not 2:4.*row 5, columns 8-11 hold 3.*structure '2:4'"):
        pack_24(w, "layer.x")
    with pytest.raises(Not24Error, match="multiple of 4"):
        check_24(torch.zeros(4, 6), "odd")


def test_backend_choice_on_cpu():
    assert pick_backend("auto", "cpu") == "dense"
    with pytest.raises(Exception, match="needs a CUDA device"):
        pick_backend("cutlass", "cpu")
    with pytest.raises(Exception, match="unknown 2:4 backend"):
        pick_backend("magic", "cpu")


@pytest.mark.parametrize("cols", [16, 13])
def test_bitmask_layout_matches_numpy_reference(cols):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, cols, generator=g)
    w[torch.rand(6, cols, generator=g) < 0.6] = 0
    d = bitmask_compress(w)
    keep = (w != 0).numpy()
    assert torch.equal(d["bitmask"], torch.from_numpy(np.packbits(keep, axis=-1, bitorder="little")))
    assert d["bitmask"].shape == (6, (cols + 7) // 8)
    assert torch.equal(d["compressed"], w[w != 0])
    counts = keep.sum(1)
    assert d["row_offsets"].tolist() == (np.cumsum(counts) - counts).tolist()
    assert d["shape"].tolist() == [[6], [cols]]
    assert torch.equal(bitmask_decompress(d["compressed"], d["bitmask"], d["shape"]), w)
    assert torch.equal(unpack_bitmask(pack_bitmask(w != 0), w.shape), w != 0)


def test_bitmask_state_dict_both_naming_styles():
    w = torch.randn(4, 8)
    w[:, ::2] = 0
    new = {f"a.b.{k}": v for k, v in bitmask_compress(w).items()}
    old = {f"a.b.weight.{k}": v for k, v in bitmask_compress(w).items()}
    for sd in (new, old):
        out = decompress_state_dict({**sd, "c.bias": torch.ones(3)})
        assert set(out) == {"a.b.weight", "c.bias"} and torch.equal(out["a.b.weight"], w)


def test_bitmask_smaller_than_dense_from_half_sparsity():
    w = torch.randn(256, 256)
    w[torch.rand(256, 256) < 0.5] = 0
    assert compressed_bytes(w) < 0.6 * w.numel() * 4
