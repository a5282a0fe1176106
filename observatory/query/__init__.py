"""Lazy queries over a family store: xarray views of every run, models and batches at a step.

- ``datasets.py``: :func:`open`, :func:`open_run`, :func:`open_family` (lazy datasets of the
  runs) and :func:`head_weights` (one head's weights, read straight from its chunks);
- ``views.py``: the TransformerLens-style per-head views of the stored parameters;
- ``models.py``: :func:`model_at`, :func:`models_at`, :func:`batch_at`;
- ``describe.py``: :func:`describe`, what ``observatory inspect`` prints;
- ``tokenizer.py``: :func:`tokenizer`, the tokenizer a text family was trained with, and
  ``window_decoder``, the ids-to-text function of ``batch_at(decode=True)`` and the report.

Dims: ``seed`` (runs of a family), ``step`` (checkpoint steps, with ``tokens_seen``),
``train_step`` (per-step metrics and batches), the parameter dims that each architecture
declares for the raw Hugging Face parameters (:mod:`observatory.models.registry`), and
``head``, ``d_head`` for the per-head views of :data:`~observatory.models.naming.VIEW_DIMS`.

Reading does not import the training loop: only replaying a step between checkpoints does.
"""

from observatory._lazy import lazy_attributes

# Functions named as their module are imported now (a module imported later would otherwise
# shadow its function); the rest on first use: ``observatory inspect`` reads metadata only
# and should not wait for transformers, which only models need.
from observatory.query.describe import describe
from observatory.query.tokenizer import tokenizer
from observatory.query.views import views

__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "observatory.models.naming": "VIEW_DIMS",
        "datasets": "head_weights open open_family open_run resolve_size",
        "models": "batch_at model_at models_at",
    },
)

__all__ = [
    "VIEW_DIMS",
    "batch_at",
    "describe",
    "head_weights",
    "model_at",
    "models_at",
    "open",
    "open_family",
    "open_run",
    "resolve_size",
    "tokenizer",
    "views",
]
