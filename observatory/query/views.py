"""TransformerLens-style per-head views of a run's lazy stacked parameters.

A view (``W_Q[step, layer, head, d_model, d_head]``, ...) splits the stored parameter's
per-head dim into ``head`` and ``d_head`` and reorders its dims; where each view sits in the
stored parameters is the architecture's declaration (:mod:`observatory.models.registry`).
Indexing a view reads only the selected heads' rows of the stored array.
"""

from __future__ import annotations

import numpy as np

from observatory.models import registry
from observatory.models.naming import PER_HEAD_DIMS, VIEW_DIMS
from observatory.store import LazyArray


def views(arrays: dict[str, LazyArray], *, architecture: str) -> dict[str, LazyArray]:
    """The TransformerLens views (:data:`~observatory.models.naming.VIEW_DIMS`) of a run's lazy
    stacked parameters, as its architecture declares them."""
    declared = registry.architecture(architecture)
    out: dict[str, LazyArray] = {
        name: View(arrays[param], ("step", *VIEW_DIMS[name]), block=(part, parts))
        for name, (param, part, parts) in declared.head_blocks.items()
    }
    for name, params in declared.whole_views.items():
        param = next(param for param in params if param in arrays)
        out[name] = View(arrays[param], ("step", *VIEW_DIMS[name]))
    return out


class View(LazyArray):
    """A view of a stored parameter: its per-head dim split into ``head`` and ``d_head`` with
    one block of each head's rows kept (if ``block = (part, parts)``), then dims reordered.

    Indexing the view reads only the rows of the selected heads: one region of the stored
    array when they are contiguous.
    """

    def __init__(
        self, source: LazyArray, dims: tuple[str, ...], *, block: tuple[int, int] | None = None
    ):
        self.source, self.block, self.dims, self.attrs = source, block, dims, {}
        shape, chunks, expanded = list(source.shape), list(source.chunks), list(source.dims)
        self.axis = None
        if block is not None:
            axis = self.axis = next(i for i, d in enumerate(source.dims) if d in PER_HEAD_DIMS)
            self.d_head = source.chunks[axis]  # per-head dims are stored in blocks of d_head
            self.n_heads = shape[axis] // (block[1] * self.d_head)
            expanded[axis : axis + 1] = ["head", "d_head"]
            shape[axis : axis + 1] = [self.n_heads, self.d_head]
            chunks[axis : axis + 1] = [1, self.d_head]
        self.order = [expanded.index(dim) for dim in dims]  # view axis -> expanded axis
        self.shape = tuple(shape[i] for i in self.order)
        self.chunks = tuple(chunks[i] for i in self.order)
        self.dtype = source.dtype
        self.token = (*source.token, dims, block)

    def read(self, key: tuple) -> np.ndarray:
        expanded: list = [None] * len(key)
        for axis, k in zip(self.order, key, strict=True):
            expanded[axis] = k
        kept = [i for i, k in enumerate(expanded) if not isinstance(k, int | np.integer)]
        if self.axis is None:
            values = self.source.read(tuple(expanded))
        else:
            values = self._read_heads(expanded)
        return values.transpose([kept.index(i) for i in self.order if i in kept])

    def _read_heads(self, expanded: list) -> np.ndarray:
        """The rows that the (head, d_head) keys at ``self.axis`` select, read in one go."""
        axis, (part, parts) = self.axis, self.block
        heads = np.arange(self.n_heads)[expanded[axis]]
        within = np.arange(self.d_head)[expanded[axis + 1]]
        rows = np.add.outer((heads * parts + part) * self.d_head, within)
        flat = rows.ravel()
        others = expanded[:axis] + expanded[axis + 2 :]
        if rows.ndim == 0:
            row_key = int(rows)
        elif len(flat) and np.array_equal(flat, np.arange(flat[0], flat[0] + len(flat))):
            row_key = slice(int(flat[0]), int(flat[0]) + len(flat))
        elif any(isinstance(k, np.ndarray) for k in others):  # zarr takes one array at most
            row_key = slice(int(flat.min()), int(flat.max()) + 1) if len(flat) else slice(0, 0)
        else:
            row_key = flat
        values = self.source.read((*expanded[:axis], row_key, *expanded[axis + 2 :]))
        if rows.ndim == 0:
            return values
        position = sum(not isinstance(k, int | np.integer) for k in expanded[:axis])
        if isinstance(row_key, slice) and row_key.stop - row_key.start != len(flat):
            values = np.take(values, flat - row_key.start, axis=position)
        shape = values.shape
        return values.reshape(*shape[:position], *rows.shape, *shape[position + 1 :])
