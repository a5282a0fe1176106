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
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

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
class Plugin:
    """A named function of ``(model, data, *, options...)``: what analyses and attribution
    targets (:mod:`observatory.attribution.targets`) share; calling it calls the function.

    Attributes
    ----------
    name
        The name results are stored under and a job's option table is called.
    function
        ``function(model, data, **options)``.
    options
        Frozen dataclass of the keyword-only options (defaults from the signature).
    """

    NOUN: ClassVar[str] = "plugin"  # what error messages call it

    name: str
    function: Callable[..., Any]
    options: type

    def __call__(self, model, data: SharedData, **options: Any) -> Any:
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
                f"{self.NOUN} {self.name!r}: its source code is not available"
            ) from None
        return hashlib.sha256(source.encode()).hexdigest()

    def parse_options(self, table: Mapping[str, Any], where: str) -> Any:
        """Validate an ``{option: value}`` table into the options dataclass (one-line errors)."""
        if not isinstance(table, Mapping) or not all(isinstance(k, str) for k in table):
            raise SpecError(
                f"{where}: options must be a mapping {{option: value}}, got {type(table).__name__}"
            )
        return from_table(self.options, dict(table), where)


@dataclass(frozen=True, eq=False)
class Analysis(Plugin):
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
    nonfinite
        The variables whose NaN or infinite values are results (stored as such); any other
        variable with a non-finite value is an error.
    """

    NOUN: ClassVar[str] = "analysis"

    variables: Variables | Callable[[Any], Variables]
    attrs: Callable[[Any, SharedData], dict[str, Any]] | None = None
    constants: Callable[[Any, SharedData], dict[str, tuple]] | None = None
    heatmaps: Mapping[str, Heatmap] = dataclasses.field(default_factory=dict)
    nonfinite: bool | frozenset[str] = False

    def declared(self, options: Any = None) -> dict[str, tuple[Dim, ...]]:
        """``{variable: dims}`` for these options (default: the default options).

        Raises
        ------
        SpecError
            On a declaration that is not ``{identifier: tuple of dims}``, or a ``nonfinite``
            name it does not declare.
        """
        variables = self.variables
        if callable(variables):
            variables = variables(self.options() if options is None else options)
        return check_declaration(self.name, variables, self.nonfinite)

    def allows_nonfinite(self, variable: str) -> bool:
        """Whether NaN or infinite values of ``variable`` are results (see ``nonfinite``)."""
        return self.nonfinite is True or (
            isinstance(self.nonfinite, frozenset) and variable in self.nonfinite
        )

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
    nonfinite: bool | Collection[str] = False,
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
        ``options -> {variable: dims}`` when the outputs depend on the options. Variable
        names are identifiers that no run variable, coordinate or dim has (see
        :func:`~observatory.jobs.resolve.check_names`).
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
    nonfinite
        ``True``, or the names of the variables, whose NaN or infinite values are results:
        they are stored as returned. Without it a non-finite value is an error, since NaN is
        also what a reader sees at a checkpoint that was not analysed (the group's ``step``
        array lists the analysed checkpoints).

    Returns
    -------
    callable
        A decorator turning the function into an :class:`Analysis` (still callable as before).

    Raises
    ------
    SpecError
        At decoration, on a function whose parameters beyond ``(model, data)`` are not all
        keyword-only options, on a name that is not an identifier, or on a declaration that
        is not ``{identifier: tuple of dims}``.

    Examples
    --------
    >>> @obs.analysis(variables={"attention_entropy": ("layer", "head")})
    ... def attention_entropy(model, data, *, base: float = 2.0):
    ...     ...
    ...     return {"attention_entropy": values}  # [n_layers, n_heads]
    """

    def wrap(function: Callable) -> Analysis:
        found = name or getattr(function, "__name__", "")
        if not callable(function) or not str(found).isidentifier():
            raise SpecError(f"@analysis: {found!r} is not a function with an identifier name")
        check_signature(function, found, options)
        declared = Analysis(
            name=found,
            function=function,
            options=options or options_class(function, validate),
            variables=variables,
            attrs=attrs,
            constants=constants,
            heatmaps=dict(heatmaps or {}),
            nonfinite=nonfinite if isinstance(nonfinite, bool) else frozenset(nonfinite),
        )
        if not callable(variables):
            declared.declared()  # a malformed declaration fails here, not in a job
        return declared

    return wrap


def check_signature(
    function: Callable, name: str, options: type | None, noun: str = "analysis"
) -> None:
    """Refuse a function that is not ``f(model, data, *, option=default, ...)``.

    Only keyword-only parameters are options; anything else beyond ``(model, data)`` would be
    silently never set, so it is an error saying how to write it.  ``**kwargs`` is allowed
    only with an explicit ``options`` class (its fields are passed by keyword).
    """
    parameters = list(inspect.signature(function).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

    def hint(option: str = "base") -> str:
        return f"write def {name}(model, data, *, {option}: float = 2.0) for an option {option!r}"

    if len(parameters) < 2 or any(p.kind not in positional for p in parameters[:2]):
        raise SpecError(f"{noun} {name!r}: it must take (model, data) first; {hint()}")
    for parameter in parameters[2:]:
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
            continue
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and options is not None:
            continue
        what = {
            inspect.Parameter.VAR_POSITIONAL: f"*{parameter.name} cannot be an option",
            inspect.Parameter.VAR_KEYWORD: f"**{parameter.name} needs an explicit options class",
        }.get(parameter.kind, f"parameter {parameter.name!r} is not keyword-only, so not an option")
        option = parameter.name if parameter.kind in positional else "base"
        raise SpecError(f"{noun} {name!r}: {what}; {hint(option)}")
    if options is not None:
        accepted = {p.name for p in parameters[2:] if p.kind is inspect.Parameter.KEYWORD_ONLY}
        fields = {f.name for f in dataclasses.fields(options)}
        takes_any = parameters[-1].kind is inspect.Parameter.VAR_KEYWORD
        stray = sorted((accepted - fields) | (set() if takes_any else fields - accepted))
        if stray:
            raise SpecError(
                f"{noun} {name!r}: {stray[0]!r} is not both a keyword-only parameter and a "
                "field of its options class"
            )


def options_class(
    function: Callable,
    validate: Callable[[Any, str], None] | None = None,
    noun: str = "analysis",
) -> type:
    """A frozen dataclass of ``function``'s keyword-only parameters (annotations, defaults)."""
    hints = typing.get_type_hints(function)
    fields = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        if parameter.default is inspect.Parameter.empty or parameter.name not in hints:
            raise SpecError(
                f"{noun} {function.__name__!r}: option {parameter.name!r} needs a type "
                f"annotation and a default, like *, {parameter.name}: float = 2.0"
            )
        default = parameter.default
        if isinstance(default, list):
            default = tuple(default)
        fields.append((parameter.name, hints[parameter.name], dataclasses.field(default=default)))
    namespace = {"validate": validate} if validate is not None else {}
    return dataclasses.make_dataclass(
        f"{function.__name__}_options", fields, frozen=True, namespace=namespace
    )


def check_declaration(
    name: str, variables: Any, nonfinite: bool | frozenset[str]
) -> dict[str, tuple[Dim, ...]]:
    """``{variable: dims}`` of a declaration, or a one-line :class:`SpecError` saying what is
    wrong with it (not a mapping, a name that is not an identifier, dims not a tuple)."""
    where = f"analysis {name!r}"
    if not isinstance(variables, Mapping) or not variables:
        raise SpecError(f"{where}: variables must be a non-empty {{name: (dims, ...)}} mapping")
    out = {}
    for variable, dims in variables.items():
        if not isinstance(variable, str) or not variable.isidentifier():
            raise SpecError(f"{where}: variable name {variable!r} is not an identifier")
        if not isinstance(dims, tuple | list):
            raise SpecError(
                f"{where}: variable {variable!r} has dims {dims!r}; give a tuple like "
                '("layer", "head") or () for a scalar'
            )
        out[variable] = tuple(dims)
    unknown = sorted(set(nonfinite) - set(out)) if isinstance(nonfinite, frozenset) else []
    if unknown:
        raise SpecError(f"{where}: nonfinite names {unknown[0]!r}, which it does not declare")
    return out


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
            elif _custom_dim(dim, sizes):
                names.append(dim[0])
                shape.append(int(dim[1]))
            else:
                raise SpecError(
                    f"{where}: variable {variable!r} has dim {dim!r}; use one of "
                    f"{', '.join(NAMED_DIMS)} or a (name, size) pair with a new name and a "
                    "positive size"
                )
        out[variable] = (tuple(names), tuple(shape))
    return out


def _custom_dim(dim: Any, sizes: Mapping[str, int]) -> bool:
    """Whether ``dim`` is a ``(name, size)`` pair of a new identifier and a positive int."""
    return (
        isinstance(dim, tuple | list)
        and len(dim) == 2
        and isinstance(dim[0], str)
        and dim[0].isidentifier()
        and dim[0] not in sizes
        and isinstance(dim[1], int | np.integer)
        and not isinstance(dim[1], bool)
        and dim[1] > 0
    )


def check_result(
    result: Any,
    variables: Mapping[str, tuple[tuple[str, ...], tuple[int, ...]]],
    where: str,
    nonfinite: Collection[str] = (),
) -> dict[str, np.ndarray]:
    """The result of one call as float32 arrays, or a one-line :class:`AnalysisError`.

    Checked against the declaration before anything is stored: a dict with exactly the
    declared variables, each numeric (bool, int or float: no strings, objects or complex
    numbers) and of the declared shape, and finite unless its name is in ``nonfinite``.
    """
    if not isinstance(result, Mapping):
        raise AnalysisError(
            f"{where}: returned {type(result).__name__}, expected a dict {{variable: array}}"
        )
    names = {str(key) for key in result}
    missing, extra = sorted(set(variables) - names), sorted(names - set(variables))
    if missing or extra or len(names) != len(result):
        said = [f"lacks {', '.join(missing)}"] * bool(missing) + [
            f"has undeclared {', '.join(extra)}"
        ] * bool(extra)
        raise AnalysisError(
            f"{where}: returned a dict that {'; '.join(said) or 'has keys that are not names'} "
            f"(declared: {', '.join(sorted(variables))})"
        )
    out = {}
    for variable, (_, shape) in variables.items():
        value = _numeric(result[variable], f"{where}: variable {variable!r}")
        if value.shape != shape:
            raise AnalysisError(
                f"{where}: variable {variable!r} has shape {value.shape}, declared {shape}"
            )
        with np.errstate(over="ignore"):  # a float64 beyond float32's range: inf, refused below
            value = value.astype(np.float32)
        bad = ~np.isfinite(value)
        if bad.any() and variable not in nonfinite:
            kinds = " and ".join(
                k for k, m in (("NaN", np.isnan(value)), ("inf", np.isinf(value))) if m.any()
            )
            raise AnalysisError(
                f"{where}: variable {variable!r} has {int(bad.sum())} non-finite values "
                f"({kinds}); if they are results, declare @obs.analysis(..., nonfinite=True)"
            )
        out[variable] = value
    return out


def _numeric(value: Any, where: str) -> np.ndarray:
    """``value`` as a numpy array of bools, ints or floats, or a one-line error."""
    try:
        if hasattr(value, "detach"):  # a torch tensor, maybe on a GPU or needing grad
            value = value.detach().cpu()
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise AnalysisError(f"{where} is not an array of numbers ({message})") from None
    if array.dtype.kind not in "biuf":
        raise AnalysisError(
            f"{where} holds {array.dtype} values ({type(value).__name__}), not numbers"
        )
    return array
