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


def test_bad_arguments_of_compute_are_one_line_errors_that_change_nothing(trained_tiny):
    import observatory as obs
    from observatory.errors import ObservatoryError, StoreError
    from tests.conftest import tree_bytes

    _, store = trained_tiny

    @obs.analysis(variables={"n_params": ()})
    def counts(model, data, *, offset: int = 0):
        """Parameter count."""
        return {"n_params": sum(p.numel() for p in model.parameters()) + offset}

    before = tree_bytes(store)
    cases = [
        ({"options": [1, 2]}, SpecError, "options must be a mapping {option: value}, got list"),
        ({"options": {"off": 1}}, SpecError, "counts: unknown key 'off'"),
        ({"options": {"offset": "a"}}, SpecError, "counts.offset"),
        ({"steps": [3]}, StoreError, "no committed checkpoint at step 3 ("),
        ({"steps": 3}, SpecError, "steps: expected a non-empty list of ints >= 0, got 3"),
        ({"steps": ["abc"]}, SpecError, "steps: expected a non-empty list of ints"),
        ({"steps": [1.5]}, SpecError, "steps: expected a non-empty list of ints"),
        ({"steps": []}, SpecError, "steps: expected a non-empty list of ints"),
        ({"steps": [-1]}, SpecError, "steps: expected a non-empty list of ints >= 0"),
        ({"size": "big"}, StoreError, "no size 'big'"),
        ({"size": 1}, SpecError, "size: expected a size name (str), got 1"),
        ({"seeds": [7]}, StoreError, "no seed 7 (seeds: [0, 1])"),
        ({"seeds": 0}, SpecError, "seeds: expected a non-empty list of ints >= 0, got 0"),
        ({"probe": {"seed": 1}}, SpecError, "ProbeSpec: expected an obs.ProbeSpec"),
        ({"analysis": len}, SpecError, "analysis: <built-in function len> is not an analysis"),
        ({"analysis": 42}, SpecError, "analysis: 42 is not an analysis"),
        ({"analysis": "nope"}, SpecError, "unknown analysis 'nope'"),
    ]
    for change, kind, needle in cases:
        arguments = {"analysis": counts, "size": "l2-d16"} | change
        with pytest.raises(kind) as err:
            obs.compute(arguments.pop("analysis"), store, **arguments)
        assert isinstance(err.value, ObservatoryError)
        message = str(err.value)
        assert len(message.splitlines()) == 1 and needle in message, (change, message)
        if change == {"steps": [3]}:
            assert "2, 4" in message  # the nearest checkpoints, as export --steps lists them
    assert tree_bytes(store) == before
