import numpy as np
import pytest
import xarray as xr

from observatory.errors import StoreError
from observatory.store import (
    AnalysisWriter,
    FamilyStore,
    analysis_arrays,
)
from observatory.store import results as store_results
from tests.store.test_writer import make_writer


def test_analysis_rows_are_buffered_then_written_step_last(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setattr(store_results, "ANALYSIS_FLUSH_ROWS", 4)
    writer, shapes = make_writer(tiny_spec, tmp_path / "s.zarr")
    writer.start()
    writer.close(complete=True)
    family = FamilyStore(tmp_path / "s.zarr", mode="r+")
    results = AnalysisWriter(
        family.run("l2-d16", 0),
        "scores",
        attrs={},
        variables={"score": (("head",), (2,))},
    )
    results.append(np.array([8, 2]), {"score": np.array([[8, 8], [2, 2]], np.float32)})
    assert results.done_steps() == {8, 2}  # buffered rows count as done for this job ...
    covered, _ = analysis_arrays(FamilyStore(tmp_path / "s.zarr").run("l2-d16", 0), "scores")
    assert len(covered) == 0  # ... but readers do not see them yet
    results.append(np.array([5, 1]), {"score": np.array([[5, 5], [1, 1]], np.float32)})
    covered, arrays = analysis_arrays(FamilyStore(tmp_path / "s.zarr").run("l2-d16", 0), "scores")
    assert list(covered) == [1, 2, 5, 8]  # 4 rows: written together, in step order
    assert np.array_equal(arrays["score"][:, 0], [1, 2, 5, 8])
    results.append(np.array([9]), {"score": np.array([[9, 9]], np.float32)})
    results.flush()  # after every stored row: appended
    results.append(np.array([3]), {"score": np.array([[3, 3]], np.float32)})
    results.flush()  # between stored rows: everything rewritten in order
    covered, arrays = analysis_arrays(FamilyStore(tmp_path / "s.zarr").run("l2-d16", 0), "scores")
    assert list(covered) == [1, 2, 3, 5, 8, 9]
    assert np.array_equal(arrays["score"], np.repeat(covered[:, None], 2, axis=1))
    plain = xr.open_zarr(
        tmp_path / "s.zarr", group="l2-d16/seed0/analysis/scores", consolidated=False
    )
    assert plain["step"].values.tolist() == [1, 2, 3, 5, 8, 9]  # plain xarray: sorted too


def test_results_without_a_variable_the_analysis_now_returns_need_recompute(tiny_spec, tmp_path):
    writer, _ = make_writer(tiny_spec, tmp_path / "s.zarr")
    writer.start()
    writer.close(complete=True)
    run = FamilyStore(tmp_path / "s.zarr", mode="r+").run("l2-d16", 0)
    old = AnalysisWriter(run, "scores", attrs={}, variables={"score": (("head",), (2,))})
    old.append(np.array([8]), {"score": np.array([[8, 8]], np.float32)})
    old.flush()
    grown = {"score": (("head",), (2,)), "extra": (("layer",), (2,))}
    with pytest.raises(StoreError, match="scores: existing results lack extra, .*--recompute"):
        AnalysisWriter(run, "scores", attrs={}, variables=grown)
    covered, _ = analysis_arrays(run, "scores")
    assert list(covered) == [8]  # kept
    AnalysisWriter(run, "scores", attrs={}, variables=grown, recompute=True)
    assert set(analysis_arrays(run, "scores")[1]) == {"score", "extra"}
