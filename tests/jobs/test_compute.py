
import numpy as np
import pytest

from observatory.cli import main
from observatory.errors import SpecError


def test_analyses_lists_the_builtins_with_variables_and_options(capsys):
    assert main(["analyses"]) == 0
    out = capsys.readouterr().out
    for name in ("head_scores", "copying", "icl", "token_loss", "head_ablation"):
        assert f"\n{name}: " in f"\n{out}"
    assert "repeated_loss_increase [step, layer, head]" in out
    assert 'ablation = "zero"' in out and "attention_pattern [step, layer, head," in out


def test_compute_runs_builtins_and_decorated_functions_in_process(trained_tiny):
    import observatory as obs

    _, store = trained_tiny

    @obs.analysis(variables={"n_params": (), "per_head": ("layer", "head", ("pair", 2))})
    def counts(model, data, *, offset: int = 0):
        """Parameter count, and a constant per head."""
        n = sum(p.numel() for p in model.parameters()) + offset
        return {"n_params": n, "per_head": np.ones((2, 2, 2))}

    ds = obs.compute(counts, store, size="l2-d16", seeds=[0], steps=[0, 8], options={"offset": 1})
    assert ds["per_head"].dims == ("seed", "step", "layer", "head", "pair")
    assert list(ds["step"].values) == [0, 8] and (ds["n_params"] > 1).all()
    with pytest.raises(SpecError, match="counts: unknown key 'off'"):
        obs.compute(counts, store, size="l2-d16", options={"off": 1})
    ablation = obs.compute("head_ablation", store, size="l2-d16", seeds=[1], steps=[8])
    assert ablation["repeated_loss_increase"].sizes == {"seed": 1, "step": 1, "layer": 2, "head": 2}
    assert np.isfinite(ablation["held_out_loss_increase"].values).all()
    patterns = obs.compute("attention_patterns", store, size="l2-d16", steps=[8])
    rows = patterns["attention_pattern"].sum("probe_key").values
    np.testing.assert_allclose(rows, 1.0, rtol=1e-5)  # every query's attention sums to one
