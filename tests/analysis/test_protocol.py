import numpy as np
import pytest

import observatory as obs
from observatory.analysis.protocol import check_result
from observatory.errors import AnalysisError, SpecError

VARIABLES = {"score": (("layer", "head"), (2, 4)), "total": ((), ())}
WHERE = "analysis 'mine' on l2-d16/seed0 at step 8"


def mine(model, data, *, base: float = 2.0):
    return {}


@pytest.mark.parametrize(
    ("definition", "needle"),
    [
        ("def f(model, data, base=2.0): ...", "parameter 'base' is not keyword-only"),
        ("def f(model, data, *args): ...", "*args cannot be an option"),
        ("def f(model, data, **kwargs): ...", "**kwargs needs an explicit options class"),
        ("def f(model): ...", "it must take (model, data) first"),
        ("def f(*, model, data): ...", "it must take (model, data) first"),
        ("def f(model, data, *, base=2.0): ...", "needs a type annotation and a default"),
        ("def f(model, data, *, base: float): ...", "needs a type annotation and a default"),
    ],
)
def test_parameters_beyond_model_and_data_must_be_keyword_only_options(definition, needle):
    namespace: dict = {}
    exec(definition, namespace)
    with pytest.raises(SpecError) as err:
        obs.analysis(variables={"x": ()})(namespace["f"])
    message = str(err.value)
    assert len(message.splitlines()) == 1 and needle in message and "'f'" in message
    assert "*, base: float = 2.0" in message  # how to write it


@pytest.mark.parametrize(
    ("variables", "needle"),
    [
        ({}, "non-empty"),
        ([("x", ())], "non-empty"),
        ({"not a name": ()}, "is not an identifier"),
        ({"x": "layer"}, "give a tuple"),
        ({"x": ()}, "nonfinite names 'y'"),
    ],
)
def test_a_malformed_declaration_is_refused_when_decorating(variables, needle):
    with pytest.raises(SpecError, match="analysis 'mine'") as err:
        obs.analysis(variables=variables, nonfinite=["y"])(mine)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("result", "needle"),
    [
        ([1.0, 2.0], "returned list, expected a dict"),
        (None, "returned NoneType, expected a dict"),
        ({"score": np.zeros((2, 4))}, "lacks total"),
        ({"score": np.zeros((2, 4)), "total": 0, "more": 1}, "has undeclared more"),
        ({"score": np.zeros((7, 3)), "total": 0}, "'score' has shape (7, 3), declared (2, 4)"),
        ({"score": np.full((2, 4), "a"), "total": 0}, "'score' holds <U1 values"),
        ({"score": np.zeros((2, 4)), "total": "x"}, "'total' holds <U1 values"),
        ({"score": np.zeros((2, 4)), "total": 1j}, "complex128"),
        ({"score": [[1, 2], [3]], "total": 0}, "is not an array of numbers"),
        ({"score": np.zeros((2, 4)), "total": np.nan}, "'total' has 1 non-finite values (NaN)"),
        ({"score": np.full((2, 4), np.inf), "total": 0}, "8 non-finite values (inf)"),
        ({"score": np.zeros((2, 4)), "total": 1e300}, "non-finite values (inf)"),  # > float32
    ],
)
def test_a_result_is_checked_against_its_declaration(result, needle):
    with pytest.raises(AnalysisError) as err:
        check_result(result, VARIABLES, WHERE)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and message.startswith(WHERE) and needle in message


def test_non_finite_values_are_results_only_where_declared():
    result = {"score": np.full((2, 4), np.nan), "total": -np.inf}
    checked = check_result(result, VARIABLES, WHERE, nonfinite=("score", "total"))
    assert np.isnan(checked["score"]).all() and checked["total"] == -np.inf
    assert checked["score"].dtype == np.float32

    declared = obs.analysis(variables={"score": (), "total": ()}, nonfinite=["score"])(mine)
    assert declared.allows_nonfinite("score") and not declared.allows_nonfinite("total")
    assert obs.analysis(variables={"x": ()}, nonfinite=True)(mine).allows_nonfinite("x")
