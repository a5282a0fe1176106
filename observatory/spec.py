"""Run specs: frozen, typed dataclasses loaded from TOML with strict validation.

A run spec describes a *model family*: every size in ``[[model.sizes]]`` is trained once per
seed pair in ``[seeds]``.  Loading rejects unknown keys, wrong types and impossible
combinations with a one-line :class:`~observatory.errors.SpecError` naming the key.
The runtime objects are built beside their code, which imports this module (never the
reverse): :func:`observatory.models.build_model`, :func:`observatory.data.build_corpus`;
``OptimizerSpec.build`` makes torch's AdamW.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from observatory.errors import SpecError
from observatory.models.registry import names as architecture_names

# --------------------------------------------------------------------------------------------
# Strict TOML -> dataclass conversion, shared by run specs and analysis specs.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except SpecError:
                pass
        raise SpecError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise SpecError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list):
            raise SpecError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        item_type = typing.get_args(tp)[0]
        return tuple(_convert(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a table, got {value!r}")
        return from_table(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML allows inf and nan; no setting means them
                raise SpecError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a programming error in a spec class
        raise TypeError(f"unsupported spec field type {tp!r}")
    raise SpecError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def from_table(cls: type, table: dict[str, Any], where: str) -> Any:
    """Build the frozen dataclass ``cls`` from a TOML table, strictly.

    Parameters
    ----------
    cls
        A dataclass whose fields carry type annotations (int, float, str, bool, Literal,
        tuples of those, nested dataclasses, optional fields).
    table
        The parsed TOML table.
    where
        Where the table sits, for error messages (e.g. ``"runs/a.toml: [train]"``).

    Raises
    ------
    SpecError
        On an unknown key, a missing required key, a wrong type, or a failed ``validate()``.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    table = _renamed(table, getattr(cls, "RENAMED", {}), where)
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise SpecError(
            f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in table:
            kwargs[name] = _convert(table[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"{where}: missing required key {name!r}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(where)
    return obj


def _renamed(table: dict[str, Any], renamed: dict[str, str], where: str) -> dict[str, Any]:
    """``table`` with each deprecated key of ``renamed`` (old -> new) under its new name."""
    for old, new in renamed.items():
        if old not in table:
            continue
        if new in table:
            raise SpecError(f"{where}: both {old!r} and {new!r} given; keep {new!r} only")
        key = f"{where}.{old}".lstrip(".")
        warnings.warn(f"{key} is deprecated: use {new!r}", FutureWarning, stacklevel=2)
        table = {new if key == old else key: value for key, value in table.items()}
    return table


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning a missing file or a syntax error into a :class:`SpecError`."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise SpecError(
            f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{path}: not valid TOML ({err})") from None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)


# --------------------------------------------------------------------------------------------
# The run spec.


@dataclass(frozen=True)
class SizeSpec:
    """One model size of the family; ``name`` labels its group in the store."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_positions: int  # size of the position table: the longest context the model accepts
    d_mlp: int | None = None  # GPT-NeoX only; defaults to 4 * d_model
    # Another size trained on the same batches: the loss bump is found in this size's loss
    # minus the control's, where the per-batch noise both share cancels (Olsson et al. compare
    # their multi-layer models with 1-layer models, which have no induction bump).
    control: str | None = None

    def validate(self, where: str) -> None:
        _require(bool(self.name) and "/" not in self.name, f"{where}.name: non-empty, no '/'")
        for key in ("n_layers", "d_model", "n_heads", "n_positions"):
            _require(getattr(self, key) > 0, f"{where}.{key}: must be positive")
        _require(
            self.d_model % self.n_heads == 0,
            f"{where}.d_model: {self.d_model} is not divisible by n_heads={self.n_heads}",
        )
        _require(self.d_mlp is None or self.d_mlp > 0, f"{where}.d_mlp: must be positive")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class ModelSpec:
    """Architecture shared by every size: ``gpt_neox`` (Pythia-style), ``attn_only``, or any
    other module of :mod:`observatory.models` (see :mod:`observatory.models.registry`)."""

    architecture: str
    vocab_size: int
    sizes: tuple[SizeSpec, ...]
    rotary_pct: float = 0.25  # gpt_neox: fraction of each head's dims that get rotary embeddings
    layer_norm: bool = True  # attn_only: LayerNorm before each attention layer and the unembed

    def validate(self, where: str) -> None:
        valid = architecture_names()
        _require(
            self.architecture in valid,
            f"{where}.architecture: expected {' or '.join(map(repr, valid))}, "
            f"got {self.architecture!r}",
        )
        _require(self.vocab_size > 1, f"{where}.vocab_size: must be at least 2")
        _require(len(self.sizes) > 0, f"{where}.sizes: the list of sizes is empty")
        names = [s.name for s in self.sizes]
        _require(len(set(names)) == len(names), f"{where}.sizes: duplicate size names {names}")
        for i, size in enumerate(self.sizes):
            _require(
                size.control is None or (size.control in names and size.control != size.name),
                f"{where}.sizes[{i}].control: {size.control!r} is not another size of the "
                f"family (sizes: {', '.join(names)})",
            )
        _require(0.0 <= self.rotary_pct <= 1.0, f"{where}.rotary_pct: must be in [0, 1]")


@dataclass(frozen=True)
class DataSpec:
    """Training corpus: a seeded synthetic induction corpus, text files, or token files.

    ``text``: documents from ``paths`` (see :mod:`observatory.data.formats`), tokenized by
    ``tokenizer`` into the on-disk token cache; ``tokens``: already tokenized files, windowed
    as they are.  Either way the token stream is cut into ``context``-token windows (see
    :mod:`observatory.data.corpus` for the packing rule).
    """

    RENAMED: ClassVar[dict[str, str]] = {"max_bytes": "max_tokens"}

    source: Literal["induction", "text", "tokens"]
    seed: int = 0  # corpus seed (synthetic data only); data *order* has its own seeds
    n_sequences: int = 16384  # synthetic corpus size
    period_min: int = 8  # synthetic: each sequence repeats a random block of this many ...
    period_max: int = 32  # ... to this many tokens, drawn per sequence
    bigram_fraction: float = 0.0  # synthetic: fraction of sequences from a Markov-bigram chain
    bigram_seed: int = 0  # synthetic: seed of the bigram table that every sequence shares
    paths: tuple[str, ...] = ()  # files or folders; "{stdlib}" is Python's stdlib, "~" home
    glob: str = "*"  # text: which files of a folder to read (searched recursively)
    exclude: tuple[str, ...] = ()  # text: paths in a folder to skip, e.g. "site-packages/*"
    field: str = "text"  # text: the text field of JSON Lines / JSON / Parquet / datasets rows
    # text: "bpe" (a byte-level BPE of model.vocab_size tokens trained on the corpus), "bytes"
    # (each UTF-8 byte is a token) or a tokenizer.json / tokenizer folder; tokens: optional,
    # a tokenizer.json / folder to decode with
    tokenizer: str | None = None
    errors: Literal["strict", "replace"] = "strict"  # text: non-UTF-8 bytes fail or become U+FFFD
    bos: bool = True  # each window starts with BOS (token 0), then context - 1 corpus tokens
    max_tokens: int | None = None  # use at most this many tokens of the stream
    dtype: str | None = None  # tokens: the token dtype of flat .bin files (uint16, uint32, ...)
    cache: str | None = None  # token cache folder (default: $OBSERVATORY_CACHE, ~/.cache/...)

    def validate(self, where: str) -> None:
        _require(self.max_tokens is None or self.max_tokens > 0, f"{where}.max_tokens: positive")
        if self.source == "induction":
            _require(self.n_sequences > 0, f"{where}.n_sequences: must be positive")
            _require(
                1 <= self.period_min <= self.period_max,
                f"{where}.period_min: need 1 <= period_min <= period_max",
            )
            _require(0.0 <= self.bigram_fraction <= 1.0, f"{where}.bigram_fraction: not in [0, 1]")
            for key in ("paths", "tokenizer", "dtype", "exclude"):
                _require(not getattr(self, key), f"{where}.{key}: not for source = 'induction'")
            return
        _require(len(self.paths) > 0, f"{where}.paths: source = {self.source!r} needs paths")
        for p in self.corpus_paths():
            megatron = self.source == "tokens" and p.with_name(p.name + ".bin").is_file()
            _require(
                p.exists() or megatron, f"{where}.paths: corpus path {str(p)!r} does not exist"
            )
        if self.source == "text":
            _require(self.dtype is None, f"{where}.dtype: only for source = 'tokens'")
        else:
            _require(self.tokenizer != "bpe", f"{where}.tokenizer: 'bpe' trains on text only")
        if self.dtype is not None:
            _require(
                self.dtype in TOKEN_DTYPES,
                f"{where}.dtype: expected one of {', '.join(TOKEN_DTYPES)}, got {self.dtype!r}",
            )
        if self.tokenizer not in (None, "bpe", "bytes"):
            path = _expand(self.tokenizer)
            _require(path.exists(), f"{where}.tokenizer: no such file or folder {str(path)!r}")

    @property
    def tokenizer_name(self) -> str | None:
        """The tokenizer: text defaults to ``"bytes"``; token files have none unless given."""
        return self.tokenizer or ("bytes" if self.source == "text" else None)

    def corpus_paths(self) -> list[Path]:
        """``paths`` with ``{stdlib}`` replaced by this interpreter's standard library."""
        return [_expand(p) for p in self.paths]


TOKEN_DTYPES = ("uint8", "uint16", "int32", "uint32", "int64")


def _expand(path: str) -> Path:
    """``path`` with ``{stdlib}`` (this interpreter's standard library) and ``~`` expanded."""
    import sysconfig

    return Path(path.replace("{stdlib}", sysconfig.get_paths()["stdlib"])).expanduser()


@dataclass(frozen=True)
class SeedSpec:
    """Init seeds (weights) and data-order seeds, varied separately or together."""

    init: tuple[int, ...]
    data: tuple[int, ...] | None = None  # defaults to the init seeds
    pairing: Literal["zip", "product"] = "zip"  # zip: init[i] with data[i]; product: all pairs

    def validate(self, where: str) -> None:
        _require(len(self.init) > 0, f"{where}.init: the list of seeds is empty")
        _require(self.data is None or len(self.data) > 0, f"{where}.data: the list is empty")
        if self.pairing == "zip" and self.data is not None and len(self.data) != len(self.init):
            raise SpecError(
                f"{where}.data: pairing = 'zip' needs as many data seeds as init seeds "
                f"({len(self.data)} vs {len(self.init)}); use pairing = 'product' to cross them"
            )
        _require(all(s >= 0 for s in self.init + (self.data or ())), f"{where}: seeds must be >= 0")
        pairs = self.pairs()
        twice = sorted({pair for pair in pairs if pairs.count(pair) > 1})
        _require(
            not twice,
            f"{where}: the seed pair (init, data) = {twice[0] if twice else ''} appears twice; "
            "its runs would be identical",
        )

    def pairs(self) -> list[tuple[int, int]]:
        """The (init_seed, data_seed) pair of every run, in run order."""
        data = self.data if self.data is not None else self.init
        if self.pairing == "zip":
            return list(zip(self.init, data, strict=True))
        return [(i, d) for i in self.init for d in data]


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    batch_size: int
    context: int  # tokens per training sequence
    # CPU float reductions depend on the thread count, so it is part of the recipe.
    threads: int = 2
    # Weights are bit-identical across runs on the same device type, not across types.
    device: Literal["cpu", "cuda"] = "cpu"

    def validate(self, where: str) -> None:
        for key in ("steps", "batch_size", "threads"):
            _require(getattr(self, key) > 0, f"{where}.{key}: must be positive")
        # a model learns from predicting token k + 1 from tokens ..k: one token predicts nothing
        _require(self.context >= 2, f"{where}.context: must be at least 2")

    def require_device(self, where: str = "train.device") -> None:
        """Fail with one line if this machine cannot train on ``device`` (checked at training
        time, not on load: a store trained on a GPU stays readable without one)."""
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise SpecError(
                f"{where}: 'cuda' but no CUDA device is available here (torch {torch.__version__})"
            )

    @property
    def tokens_per_step(self) -> int:
        """Tokens the model sees per step: checkpoint ``s`` has seen ``s * tokens_per_step``."""
        return self.batch_size * self.context


@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW with linear warm-up, then a constant, linear or cosine schedule.

    A linear or cosine decay runs over every step after the warm-up, or, with
    ``decay_steps``, over the last ``decay_steps`` steps only, after a constant stretch
    (warm-up, stable, decay): a high rate for as long as circuits are forming, annealed
    at the end.
    """

    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping (the gradient norm is still recorded)
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = 0.1  # linear/cosine decay to lr * min_lr_ratio at the last step
    decay_steps: int = 0  # decay over the last N steps only (0: every step after warm-up)

    def validate(self, where: str) -> None:
        _require(self.lr > 0, f"{where}.lr: must be positive")
        _require(self.eps > 0, f"{where}.eps: must be positive")
        _require(len(self.betas) == 2, f"{where}.betas: need two numbers")
        _require(all(0 <= b < 1 for b in self.betas), f"{where}.betas: must be in [0, 1)")
        _require(self.weight_decay >= 0, f"{where}.weight_decay: must be >= 0")
        _require(self.grad_clip >= 0, f"{where}.grad_clip: must be >= 0")
        _require(self.warmup_steps >= 0, f"{where}.warmup_steps: must be >= 0")
        _require(0 <= self.min_lr_ratio <= 1, f"{where}.min_lr_ratio: must be in [0, 1]")
        _require(self.decay_steps >= 0, f"{where}.decay_steps: must be >= 0")
        _require(
            self.decay_steps == 0 or self.schedule != "constant",
            f'{where}.decay_steps: a constant schedule does not decay (schedule = "linear" '
            'or "cosine")',
        )

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate used for the update of ``step`` (a pure function: nothing to save)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        start = total_steps - self.decay_steps if self.decay_steps else self.warmup_steps
        if step < start:
            return self.lr
        progress = (step - start) / max(1, total_steps - start)
        floor = self.lr * self.min_lr_ratio
        if self.schedule == "linear":
            return floor + (self.lr - floor) * (1 - progress)
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def build(self, model):
        """Return a ``torch.optim.AdamW`` over ``model``'s parameters."""
        import torch

        return torch.optim.AdamW(
            model.parameters(),
            lr=self.lr,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
        )


@dataclass(frozen=True)
class CheckpointSpec:
    """Pythia-style schedule: log-spaced early steps, every ``every`` steps, plus extras."""

    log_spaced: bool = True  # steps 0, 1, 2, 4, 8, ...
    every: int = 0  # also every N steps (0: off)
    extra: tuple[int, ...] = ()
    every_step: bool = False  # checkpoint after every single step
    # AdamW moments and RNG state only at every N-th checkpoint (a keyframe); weights at all
    state_every: int = 1

    def validate(self, where: str) -> None:
        _require(self.every >= 0, f"{where}.every: must be >= 0")
        _require(self.state_every >= 1, f"{where}.state_every: must be >= 1")
        _require(all(s >= 0 for s in self.extra), f"{where}.extra: steps must be >= 0")

    def steps(self, total_steps: int) -> tuple[int, ...]:
        """Sorted checkpoint steps in ``[0, total_steps]``; 0 and the last step always included."""
        if self.every_step:
            return tuple(range(total_steps + 1))
        steps = {0, total_steps}
        if self.log_spaced:
            steps.update(2**k for k in range(total_steps.bit_length()) if 2**k <= total_steps)
        if self.every:
            steps.update(range(0, total_steps + 1, self.every))
        steps.update(self.extra)
        return tuple(sorted(steps))

    def keyframes(self, total_steps: int) -> tuple[int, ...]:
        """Checkpoints that also store the optimizer and RNG state: every ``state_every``-th
        one, and always the first (step 0) and the last (so a finished run can be continued).
        """
        steps = self.steps(total_steps)
        last = len(steps) - 1
        return tuple(s for i, s in enumerate(steps) if i % self.state_every == 0 or i == last)


@dataclass(frozen=True)
class StoreSpec:
    """How checkpoints are laid out on disk and how often they are committed."""

    # Keys accepted under an old name: the table's key is read as the new one, with a warning.
    RENAMED: ClassVar[dict[str, str]] = {"checkpoints_per_shard": "checkpoints_per_chunk"}

    checkpoints_per_chunk: int = 64  # one chunk file holds this many checkpoints of an array
    commit_seconds: float = 20.0  # commit buffered checkpoints at least this often
    compressor: Literal["lz4", "zstd"] = "lz4"  # Blosc codec with byte shuffle (lossless)
    compression_level: int = 5  # Blosc level, 1 (fast) .. 9 (small)
    # Trained float32 weights barely compress, and decoding dominates reading one head across
    # all checkpoints: the weights are stored with a checksum only, unless this is set.  Other
    # arrays use Blosc.
    compress_weights: bool = False

    def validate(self, where: str) -> None:
        _require(self.checkpoints_per_chunk > 0, f"{where}.checkpoints_per_chunk: must be positive")
        _require(self.commit_seconds >= 0, f"{where}.commit_seconds: must be >= 0")
        _require(1 <= self.compression_level <= 9, f"{where}.compression_level: not in 1..9")


@dataclass(frozen=True)
class RunSpec:
    """A model family: every size x seed pair, trained on the same data with the same recipe."""

    name: str
    model: ModelSpec
    data: DataSpec
    seeds: SeedSpec
    train: TrainSpec
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    checkpoints: CheckpointSpec = field(default_factory=CheckpointSpec)
    store: StoreSpec = field(default_factory=StoreSpec)
    store_path: str | None = None  # default: store/<name>.zarr

    def validate(self, where: str) -> None:
        _require(bool(self.name) and "/" not in self.name, f"{where}.name: non-empty, no '/'")
        late = [step for step in self.checkpoints.extra if step > self.train.steps]
        _require(
            not late,
            f"{where}.checkpoints.extra: step {late[0] if late else ''} is after the last step "
            f"({self.train.steps})",
        )
        for size in self.model.sizes:
            _require(
                self.train.context <= size.n_positions,
                f"{where}.train.context: {self.train.context} is longer than the position table "
                f"of size {size.name!r} (n_positions = {size.n_positions})",
            )
        decay = self.optimizer.decay_steps
        _require(
            not decay or decay + self.optimizer.warmup_steps <= self.train.steps,
            f"{where}.optimizer.decay_steps: {decay} after {self.optimizer.warmup_steps} warm-up "
            f"steps do not fit in {self.train.steps} steps",
        )
        if self.data.tokenizer_name == "bytes":
            _require(
                self.model.vocab_size >= 256,
                f"{where}.model.vocab_size: byte-level text needs vocab_size >= 256",
            )
        if self.data.source == "induction":
            _require(
                self.data.period_max < self.train.context,
                f"{where}.data.period_max: {self.data.period_max} must be shorter than the "
                f"context ({self.train.context}) so that blocks repeat",
            )

    @property
    def default_store(self) -> str:
        return self.store_path or f"store/{self.name}.zarr"

    def runs(
        self, *, seeds: Sequence[int] | None = None, sizes: Sequence[str] | None = None
    ) -> list[RunId]:
        """The runs of the family, one per size and seed pair, in training order: all of them,
        or those of the given seed indices and size names.

        Raises
        ------
        SpecError
            If a given seed or size does not exist (the message lists those that do).
        """
        n_seeds = len(self.seeds.pairs())
        for seed in seeds or ():
            if not 0 <= seed < n_seeds:
                raise SpecError(f"--seeds: no seed {seed} in the spec (seeds: 0..{n_seeds - 1})")
        names = [size.name for size in self.model.sizes]
        for size in sizes or ():
            if size not in names:
                raise SpecError(
                    f"--sizes: no size {size!r} in the spec (sizes: {', '.join(names)})"
                )
        return [
            RunId(size=size.name, seed=index, init_seed=init, data_seed=data)
            for size in self.model.sizes
            for index, (init, data) in enumerate(self.seeds.pairs())
            if (seeds is None or index in seeds) and (sizes is None or size.name in sizes)
        ]

    def size(self, name: str) -> SizeSpec:
        for size in self.model.sizes:
            if size.name == name:
                return size
        raise SpecError(f"no size {name!r} (sizes: {', '.join(s.name for s in self.model.sizes)})")

    def to_dict(self) -> dict[str, Any]:
        """A TOML/JSON-compatible dict that :func:`spec_from_dict` turns back into this spec."""
        return _strip_none(dataclasses.asdict(self))


BRANCHES = "branches"  # the group of a run's branches, inside the run's group


@dataclass(frozen=True)
class RunId:
    """One run of a family: a size and a seed pair; ``seed`` is its index in the seed list.

    ``branch`` names a counterfactual branch of that run (``""``: the run itself); a branch
    ``b`` of its branch ``a`` is ``"a/b"``.
    """

    size: str
    seed: int
    init_seed: int
    data_seed: int
    branch: str = ""

    @property
    def path(self) -> str:
        """Where the run lives in its store: ``l2-d64/seed0``, ``l2-d64/seed0/branches/a``,
        ``l2-d64/seed0/branches/a/branches/b``."""
        run = f"{self.size}/seed{self.seed}"
        return "/".join([run, *(f"{BRANCHES}/{name}" for name in self.branch.split("/") if name)])


def parse_run_path(text: str) -> tuple[str, int, str]:
    """``(size, seed, branch)`` of a run's path as :attr:`RunId.path` writes it.

    ``"l2-d64/seed0"`` is ``("l2-d64", 0, "")``, ``"l2-d64/seed0/branches/a/branches/b"`` is
    ``("l2-d64", 0, "a/b")``.

    Raises
    ------
    SpecError
        One line, for any other text.
    """
    size, _, rest = str(text).partition("/seed")
    seed, _, branches = rest.partition("/")
    parts = branches.split("/") if branches else []
    names = parts[1::2]
    if (
        not size
        or not seed.isascii()
        or not seed.isdigit()
        or len(parts) % 2
        or any(part != BRANCHES for part in parts[::2])
        or not all(names)
    ):
        raise SpecError(
            f"expected a run like l2-d64/seed0 or a branch like l2-d64/seed0/branches/NAME, "
            f"got {text!r}"
        )
    return size, int(seed), "/".join(names)


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_strip_none(v) for v in value]
    return value


def spec_from_dict(table: dict[str, Any]) -> RunSpec:
    """Validate a parsed run-spec table and return the :class:`RunSpec`."""
    return from_table(RunSpec, table, "")


def load_run_spec(path: str | Path) -> RunSpec:
    """Load and validate a run spec from a TOML file.

    Parameters
    ----------
    path
        A ``runs/*.toml`` file.

    Returns
    -------
    RunSpec
        The frozen, validated spec.

    Raises
    ------
    SpecError
        With a one-line message naming the offending key.
    """
    return load_spec(RunSpec, path)


def load_spec(cls: type, path: str | Path) -> Any:
    """Load a TOML file into the spec dataclass ``cls``; errors are prefixed with the path."""
    table = load_toml(path)
    try:
        return from_table(cls, table, "")
    except SpecError as err:
        raise SpecError(f"{path}: {str(err).lstrip('.: ')}") from None
