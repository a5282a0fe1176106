"""Observatory: seeded model families with dense checkpoints in one zarr store per family.

The query API is imported lazily, so ``import observatory`` stays cheap::

    import observatory as obs

    ds = obs.open_family("store/induction.zarr", size="l2-d64")
    ds["W_Q"].sel(layer=1, head=2)  # dims (seed, step, d_model, d_head), lazily indexed
"""

from importlib import import_module

# Public names, imported from their module on first use.
_LAZY = {
    **dict.fromkeys(
        ("open", "open_run", "open_family", "head_weights", "model_at", "batch_at", "describe"),
        "observatory.query",
    ),
    "summary": "observatory.report.results",
    "compute": "observatory.jobs.compute",
    "replay": "observatory.train.replay",
    "transformer_lens_at": "observatory.interop.lens",
}
# Subpackages resolve as attributes (``obs.store.FamilyStore``), imported on first use.
# ``obs.analysis`` is callable: the decorator ``@obs.analysis(variables=...)`` (a plain function
# would be shadowed by the subpackage).
_SUBMODULES = (
    "analysis",
    "data",
    "errors",
    "interop",
    "jobs",
    "models",
    "query",
    "report",
    "spec",
    "store",
    "train",
)

__all__ = [*_LAZY, *_SUBMODULES]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return import_module(f"observatory.{name}")
    raise AttributeError(f"module 'observatory' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
