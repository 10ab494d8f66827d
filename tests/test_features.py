import numpy as np
import pytest
import torch

from sae.data.features import FORMAT, LayerWriter, SparseCodes, open_run, write_layer, write_run_info


def _random_codes(rng, n=50, d=40, density=0.1):
    dense = rng.random((n, d)).astype(np.float32)
    dense[rng.random((n, d)) > density] = 0
    return dense


def test_roundtrip_streamed_and_memmapped(tmp_path):
    rng = np.random.default_rng(0)
    dense = _random_codes(rng)
    with LayerWriter(tmp_path / "run", layer=3, d_sae=40) as w:
        for start in range(0, 50, 17):
            w.append(SparseCodes.from_dense(dense[start : start + 17]))
    write_run_info(tmp_path / "run", {"row_ids": list(range(50))})
    run = open_run(tmp_path, "run")
    assert run.format == FORMAT and run.layers == [3]
    codes = run.load(3)
    assert isinstance(codes.values, np.memmap)
    np.testing.assert_array_equal(codes.to_dense(), dense)
    np.testing.assert_array_equal(codes.to_scipy().toarray(), dense)
    np.testing.assert_array_equal(codes.to_torch().to_dense().numpy(), dense)
    np.testing.assert_array_equal(codes.rows(5, 20).to_dense(), dense[5:20])


def test_from_topk_sorts_and_drops_zeros():
    values = np.array([[0.5, 0.0, 2.0]], dtype=np.float32)
    indices = np.array([[7, 1, 3]])
    codes = SparseCodes.from_topk(values, indices, d_sae=8)
    assert codes.indices.tolist() == [3, 7] and codes.values.tolist() == [2.0, 0.5]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        with LayerWriter(tmp_path / "run", layer=0, d_sae=4) as w:
            w.append(SparseCodes.from_dense(np.eye(4, dtype=np.float32)))
            raise RuntimeError("killed")
    assert not (tmp_path / "run" / "layer00").exists()
    assert list((tmp_path / "run").iterdir()) == []


def test_original_dense_format_and_layer_order(tmp_path):
    run = tmp_path / "orig"
    run.mkdir()
    rng = np.random.default_rng(1)
    mats = {l: _random_codes(rng) for l in (-1, 0, 10, 2)}
    for l, m in mats.items():
        torch.save(torch.from_numpy(m).half(), run / f"layer{l:02d}.pt")
    r = open_run(tmp_path, "orig")
    assert r.layers == [0, 2, 10, -1]
    np.testing.assert_allclose(r.load(10).to_dense(), mats[10].astype(np.float16), rtol=0)


def test_missing_run_lists_available(tmp_path):
    write_layer(tmp_path / "a", 0, SparseCodes.from_dense(np.eye(3, dtype=np.float32)))
    write_run_info(tmp_path / "a", {})
    (tmp_path / "orig").mkdir()
    torch.save(torch.zeros(3, 2), tmp_path / "orig" / "layer-1.pt")
    (tmp_path / "stopped").mkdir()  # a run killed before recording: not offered as available
    (tmp_path / "stopped" / "settings.json").write_text("{}")
    with pytest.raises(ValueError, match=r"no run 'b' in .* \(available: a, orig; unfinished: stopped\)$"):
        open_run(tmp_path, "b")
