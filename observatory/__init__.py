"""Observatory: seeded model families with dense checkpoints in one zarr store per family.

The query API is imported lazily, so ``import observatory`` stays cheap::

    import observatory as obs

    ds = obs.open_family("store/induction.zarr", size="l2-d64")
    ds["W_Q"].sel(layer=1, head=2)  # dims (seed, step, d_model, d_head), lazily indexed
"""

from observatory._lazy import lazy_attributes

# Public names, imported from their module on first use.
_LAZY = {
    "observatory.query": "open open_run open_family head_weights model_at batch_at describe "
    "tokenizer",
    "observatory.report.results": "summary",
    "observatory.report.transitions": "transitions",
    "observatory.jobs.compute": "compute",
    "observatory.train.replay": "replay",
    "observatory.interop.lens": "transformer_lens_at",
    "observatory.attribution.results": "attribute top_examples",
    "observatory.attribution.dynamics": "measure_dynamics dynamics",
    "observatory.attribution.targets": "target",
}
# Subpackages resolve as attributes (``obs.store.FamilyStore``), imported on first use.
# ``obs.analysis`` is callable: the decorator ``@obs.analysis(variables=...)`` (a plain function
# would be shadowed by the subpackage); so is ``obs.attribution``, the reader
# ``obs.attribution(store, size=..., seed=..., name=...)``.
_SUBMODULES = (
    "analysis",
    "attribution",
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

__all__ = [*(name for names in _LAZY.values() for name in names.split()), *_SUBMODULES]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, submodules=_SUBMODULES)
