"""The original format's .pt layers read without torch: equal to torch.load, no code from the file runs,
one streamed conversion to csr-v1 kept beside the file and reused until the file changes."""

import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from sae.data.features import FeatureRun, SparseCodes, convert_layer, iter_codes, read_sidecar, sidecar_path
from sae.data.ptfile import load_dense, read_pt_array
from sae.util.errors import InputError


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_read_equals_torch_load_for_views(tmp_path, dtype):
    x = torch.relu(torch.randn(37, 11)).to(dtype)
    for name, t in (("plain", x), ("transposed", x.t()), ("sliced", x[3:, 2:])):
        torch.save(t, tmp_path / f"{name}.pt")
        got = read_pt_array(tmp_path / f"{name}.pt")
        assert got is not None and got.dtype == t.numpy().dtype
        np.testing.assert_array_equal(got, t.numpy())


def test_bfloat16_and_legacy_files_go_through_torch(tmp_path):
    x = torch.relu(torch.randn(9, 5))
    torch.save(x.bfloat16(), tmp_path / "bf16.pt")
    assert read_pt_array(tmp_path / "bf16.pt") is None
    np.testing.assert_array_equal(load_dense(tmp_path / "bf16.pt"), x.bfloat16().float().numpy())
    torch.save(x, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert read_pt_array(tmp_path / "legacy.pt") is None
    np.testing.assert_array_equal(load_dense(tmp_path / "legacy.pt"), x.numpy())


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "layer00.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("layer00/data.pkl", pickle.dumps(_Payload(marker), protocol=2))
        z.writestr("layer00/byteorder", "little")
    assert read_pt_array(path) is None  # refused: not a tensor
    with pytest.raises(InputError, match="not a readable torch file"):
        load_dense(path)  # torch's weights_only loader refuses it too
    with pytest.raises(InputError, match="layer00.pt"):
        FeatureRun(tmp_path).load(0)
    assert not marker.exists()


def test_garbage_is_one_line_error(tmp_path):
    (tmp_path / "layer00.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match="layer00.pt"):
        load_dense(tmp_path / "layer00.pt")


def test_conversion_is_streamed_exact_kept_and_reused(tmp_path):
    rng = np.random.default_rng(0)
    dense = np.maximum(rng.standard_normal((1000, 64)) - 1.5, 0).astype(np.float16)
    dense[5, 7] = -0.0  # a negative zero is a zero
    dense[6, 3] = -2.0  # negative values are kept (the original format holds any float)
    torch.save(torch.from_numpy(dense), tmp_path / "layer03.pt")
    chunks = list(iter_codes(dense, chunk_entries=64 * 100))
    assert len(chunks) == 10 and sum(c.n_rows for c in chunks) == 1000
    codes = FeatureRun(tmp_path).load(3)
    ref = SparseCodes.from_dense(dense.astype(np.float32))
    for name in ("indptr", "indices", "values"):
        np.testing.assert_array_equal(getattr(codes, name), getattr(ref, name))
    assert isinstance(codes.values, np.memmap) and sidecar_path(tmp_path / "layer03.pt").is_dir()
    assert FeatureRun(tmp_path).layers == [3]  # the copy is not a layer
    again = read_sidecar(tmp_path / "layer03.pt")
    assert again is not None and again.nnz == ref.nnz
    dense[0, 0] = 1.0
    torch.save(torch.from_numpy(dense), tmp_path / "layer03.pt")  # changed: the copy is stale
    assert read_sidecar(tmp_path / "layer03.pt") is None
    assert convert_layer(tmp_path / "layer03.pt", 3).nnz == ref.nnz + 1


def test_convert_command(tmp_path, capsys):
    from sae.__main__ import main

    dense = np.maximum(np.random.default_rng(1).standard_normal((50, 16)) - 1, 0).astype(np.float16)
    for layer in (0, 1):
        torch.save(torch.from_numpy(dense), tmp_path / f"layer{layer:02d}.pt")
    assert main(["convert", str(tmp_path), "--quiet"]) == 0
    assert "layer01.csr-v1" in capsys.readouterr().out
    assert read_sidecar(tmp_path / "layer00.pt") is not None and read_sidecar(tmp_path / "layer01.pt") is not None
    with pytest.raises(InputError, match="not a folder of original-format"):
        main(["convert", str(tmp_path / "nope")])
