"""The analysis protocol: a named pure function of (model, shared data) with declared outputs.

An analysis is a function ``fn(model, data, *, option=default, ...)`` decorated with
:func:`analysis`. It gets one checkpoint's model (eval mode) and the job's :class:`SharedData`
and returns ``{variable: values}``, one numpy array per declared variable, shaped by the
variable's dims (the ``step`` dim is added by the caller). Its keyword-only options form a
frozen dataclass that job files fill from the ``[<analysis name>]`` table, validated like run
specs (:func:`~observatory.spec.from_table`). Nothing here reads or writes files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from observatory.analysis.probes import Probe
from observatory.errors import AnalysisError, SpecError
from observatory.spec import RunSpec, from_table

# A dim is a name whose size comes from the model (see ``dim_sizes``) or ``(name, size)``.
Dim = str | tuple[str, int]
Variables = Mapping[str, tuple[Dim, ...]]
# Dims whose size comes from the model's size and the shared data (see ``dim_sizes``).
NAMED_DIMS = (
    "layer",
    "head",
    "d_model",
    "d_head",
    "d_vocab",
    "position",
    "loss_position",
    "held_out",
    "probe_sequence",
    "probe_position",
    "probe_query",
    "probe_key",
)


@dataclass(frozen=True, eq=False)
class SharedData:
    """What every analysis gets besides the model: one job's probe, held-out data and spec.

    Generated once per job from recorded seeds and shared by every checkpoint and seed.

    Attributes
    ----------
    probe
        The repeated-random-token probe (``probe.tokens[probe_sequence, probe_position]``).
    held_out_tokens
        ``tokens[held_out, position]`` (int64): held-out sequences of the training context.
    held_out_seed
        The seed the held-out sequences (and any per-sequence choice) derive from.
    held_out_source
        Where the held-out sequences come from, in words.
    spec
        The family's run spec.
    """

    probe: Probe
    held_out_tokens: np.ndarray
    held_out_seed: int
    held_out_source: str
    spec: RunSpec

    @property
    def probe_tokens(self) -> np.ndarray:
        """``tokens[probe_sequence, probe_position]`` (int64) of the probe."""
        return self.probe.tokens

    @property
    def held_out_attrs(self) -> dict[str, Any]:
        """Attributes describing the held-out sequences, to store next to results on them."""
        return {"held_out": self.held_out_source, "held_out_n_sequences": len(self.held_out_tokens)}


@dataclass(frozen=True)
class Heatmap:
    """How the report draws a per-head variable (``[step, layer, head]``) as heatmaps.

    Attributes
    ----------
    title
        What the variable is, e.g. ``"Induction score"`` (the figure says "... of every head").
    colours
        The colour map's name (matplotlib's; plotly knows the same names).
    low, high
        The values at the ends of the colour scale.
    """

    title: str
    colours: str = "viridis"
    low: float = 0.0
    high: float = 1.0


@dataclass(frozen=True, eq=False)
class Analysis:
    """A registered analysis; calling it calls the function.

    Attributes
    ----------
    name
        The name results are stored under (``<run>/analysis/<name>``) and the job's option
        table is called.
    function
        ``function(model, data, **options) -> {variable: numpy array}``.
    options
        Frozen dataclass of the keyword-only options (defaults from the signature).
    variables
        ``{variable: dims}`` or a callable ``options -> {variable: dims}``.
    attrs
        Optional callable ``(options, data) -> dict``: the parameters stored with the results;
        default: the options.
    constants
        Optional callable ``(options, data) -> {name: (dims, values)}``: arrays that do not
        depend on the checkpoint (e.g. the probe tokens), stored once beside the results.
    heatmaps
        ``{variable: Heatmap}``: per-head variables the report's pages draw as heatmaps.
    """

    name: str
    function: Callable[..., Mapping[str, Any]]
    options: type
    variables: Variables | Callable[[Any], Variables]
    attrs: Callable[[Any, SharedData], dict[str, Any]] | None = None
    constants: Callable[[Any, SharedData], dict[str, tuple]] | None = None
    heatmaps: Mapping[str, Heatmap] = dataclasses.field(default_factory=dict)

    def __call__(self, model, data: SharedData, **options: Any) -> Mapping[str, Any]:
        return self.function(model, data, **options)

    @property
    def doc(self) -> str:
        """The first line of the function's docstring."""
        return (inspect.getdoc(self.function) or "").partition("\n")[0]

    def source_hash(self) -> str:
        """SHA-256 of the function's source text (changes when the function is edited)."""
        try:
            source = inspect.getsource(self.function)
        except (OSError, TypeError):
            raise AnalysisError(
                f"analysis {self.name!r}: its source code is not available"
            ) from None
        return hashlib.sha256(source.encode()).hexdigest()

    def parse_options(self, table: Mapping[str, Any], where: str) -> Any:
        """Validate the job's ``[<name>]`` table into the options dataclass (one-line errors)."""
        return from_table(self.options, dict(table), where)

    def declared(self, options: Any = None) -> dict[str, tuple[Dim, ...]]:
        """``{variable: dims}`` for these options (default: the default options)."""
        variables = self.variables
        if callable(variables):
            variables = variables(self.options() if options is None else options)
        return {name: tuple(dims) for name, dims in variables.items()}

    def parameters(self, options: Any, data: SharedData) -> dict[str, Any]:
        """The parameters to store with the results (JSON-ready)."""
        if self.attrs is not None:
            return self.attrs(options, data)
        return dataclasses.asdict(options)


def analysis(
    *,
    variables: Variables | Callable[[Any], Variables],
    name: str | None = None,
    options: type | None = None,
    attrs: Callable[[Any, SharedData], dict[str, Any]] | None = None,
    validate: Callable[[Any, str], None] | None = None,
    constants: Callable[[Any, SharedData], dict[str, tuple]] | None = None,
    heatmaps: Mapping[str, Heatmap] | None = None,
) -> Callable[[Callable], Analysis]:
    """Declare an analysis: a pure function of (model, shared data) with declared outputs.

    Parameters
    ----------
    variables
        ``{variable: dims}``: the dims of each returned array after ``step``. A dim is a name
        whose size comes from the model (``layer``, ``head``, ``d_model``, ``d_head``,
        ``d_vocab``, ``position``: the context, ``loss_position``: context - 1, ``held_out``:
        held-out sequences, ``probe_sequence``, ``probe_position``, ``probe_query`` and
        ``probe_key``: probe length) or a ``(name, size)`` pair. May also be a callable
        ``options -> {variable: dims}`` when the outputs depend on the options.
    name
        The analysis's name (default: the function's name).
    options
        A frozen dataclass of the options (default: one made from the function's keyword-only
        parameters, which must all have annotations and defaults). Its ``validate(where)``
        method, if any, runs on every job.
    attrs
        A callable ``(options, data) -> dict`` of parameters to store with the results
        (default: the options).
    validate
        A callable ``(options, where)`` raising :class:`~observatory.errors.SpecError` on
        impossible combinations of options (with the derived options class).
    constants
        A callable ``(options, data) -> {name: (dims, values)}`` of checkpoint-independent
        arrays stored once beside the results.
    heatmaps
        ``{variable: Heatmap}``: per-head variables (dims ``("layer", "head")``) that the
        report's interactive page draws as heatmaps of every head over training.

    Returns
    -------
    callable
        A decorator turning the function into an :class:`Analysis` (still callable as before).

    Examples
    --------
    >>> @obs.analysis(variables={"attention_entropy": ("layer", "head")})
    ... def attention_entropy(model, data, *, base: float = 2.0):
    ...     ...
    ...     return {"attention_entropy": values}  # [n_layers, n_heads]
    """

    def wrap(function: Callable) -> Analysis:
        return Analysis(
            name=name or function.__name__,
            function=function,
            options=options or options_class(function, validate),
            variables=variables,
            attrs=attrs,
            constants=constants,
            heatmaps=dict(heatmaps or {}),
        )

    return wrap


def options_class(function: Callable, validate: Callable[[Any, str], None] | None = None) -> type:
    """A frozen dataclass of ``function``'s keyword-only parameters (annotations, defaults)."""
    hints = typing.get_type_hints(function)
    fields = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        if parameter.default is inspect.Parameter.empty or parameter.name not in hints:
            raise SpecError(
                f"analysis {function.__name__!r}: option {parameter.name!r} needs a type "
                "annotation and a default"
            )
        default = parameter.default
        if isinstance(default, list):
            default = tuple(default)
        fields.append((parameter.name, hints[parameter.name], dataclasses.field(default=default)))
    namespace = {"validate": validate} if validate is not None else {}
    return dataclasses.make_dataclass(
        f"{function.__name__}_options", fields, frozen=True, namespace=namespace
    )


def dim_sizes(*, n_layers: int, n_heads: int, d_model: int, data: SharedData) -> dict[str, int]:
    """Sizes of the named dims (:data:`NAMED_DIMS`) for one model size and the shared data."""
    return {
        "layer": n_layers,
        "head": n_heads,
        "d_model": d_model,
        "d_head": d_model // n_heads,
        "d_vocab": data.spec.model.vocab_size,
        "position": data.spec.train.context,
        "loss_position": data.spec.train.context - 1,
        "held_out": len(data.held_out_tokens),
        "probe_sequence": data.probe_tokens.shape[0],
        "probe_position": data.probe_tokens.shape[1],
        "probe_query": data.probe_tokens.shape[1],
        "probe_key": data.probe_tokens.shape[1],
    }


def resolve_variables(
    variables: Mapping[str, tuple[Dim, ...]], sizes: Mapping[str, int], where: str
) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """``{variable: (dim names, shape)}`` of declared variables, given the named dims' sizes.

    Raises
    ------
    SpecError
        On a dim that is neither a named dim nor a ``(name, size)`` pair.
    """
    out = {}
    for variable, dims in variables.items():
        names, shape = [], []
        for dim in dims:
            if isinstance(dim, str) and dim in sizes:
                names.append(dim)
                shape.append(sizes[dim])
            elif isinstance(dim, tuple) and len(dim) == 2 and isinstance(dim[1], int):
                names.append(str(dim[0]))
                shape.append(int(dim[1]))
            else:
                raise SpecError(
                    f"{where}: variable {variable!r} has dim {dim!r}; use one of "
                    f"{', '.join(NAMED_DIMS)} or a (name, size) pair"
                )
        out[variable] = (tuple(names), tuple(shape))
    return out


def check_result(
    result: Any, variables: Mapping[str, tuple[tuple[str, ...], tuple[int, ...]]], where: str
) -> dict[str, np.ndarray]:
    """The result of one call as float32 arrays, or a one-line error on a wrong shape or name."""
    if not isinstance(result, Mapping):
        raise AnalysisError(f"{where}: returned {type(result).__name__}, expected a dict")
    if set(result) != set(variables):
        raise AnalysisError(
            f"{where}: returned variables {sorted(result)}, declared {sorted(variables)}"
        )
    out = {}
    for variable, (_, shape) in variables.items():
        value = np.asarray(result[variable], dtype=np.float32)
        if value.shape != shape:
            raise AnalysisError(
                f"{where}: variable {variable!r} has shape {value.shape}, declared {shape}"
            )
        out[variable] = value
    return out
