"""Loading results: a control size named by the spec but not trained."""

import numpy as np

from observatory.report.results import load_results
from observatory.spec import load_run_spec
from observatory.train import train_family
from tests.conftest import TINY_TOML, write_spec

CONTROL = """
[[model.sizes]]
name = "l1-d16"
n_layers = 1
d_model = 16
n_heads = 2
n_positions = 16
"""


def test_a_control_without_trained_runs_gives_nan_control_loss(tmp_path):
    text = TINY_TOML.replace("n_positions = 16\n", 'n_positions = 16\ncontrol = "l1-d16"\n', 1)
    text = text.replace("\n[data]", CONTROL + "\n[data]")
    spec = load_run_spec(write_spec(tmp_path, text))
    store = train_family(spec, store=tmp_path / "s.zarr", sizes=["l2-d16"], progress=False)
    ds = load_results(store, size="l2-d16")
    assert ds["control_loss"].attrs["control"] == "l1-d16"
    assert np.isnan(ds["control_loss"].values).all() and np.isfinite(ds["loss"].values).all()
