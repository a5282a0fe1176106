"""The storage package: the only code that knows zarr and the layout of an observatory store.

One module per concern: :mod:`~observatory.store.layout` (names, attributes, chunking, schema
version, creating and opening a family), :mod:`~observatory.store.paths` (local paths and
fsspec URLs), :mod:`~observatory.store.integrity` (the checked store and the ledger's digests),
:mod:`~observatory.store.common` (opening nodes, the metadata cache),
:mod:`~observatory.store.lock` (one writer per run), :mod:`~observatory.store.writer`,
:mod:`~observatory.store.reader`, :mod:`~observatory.store.results` (analysis results),
:mod:`~observatory.store.ledger` (verifying a run) and :mod:`~observatory.store.lazy` (arrays
for xarray).
"""

from observatory.store.integrity import state_digest, weights_digest
from observatory.store.layout import (
    ATTRS_KEY,
    MOMENTS,
    SCHEMA_VERSION,
    STEP_RECORDS,
    WRITE_PIECE,
    Checkpoint,
    StepRecord,
    create_family,
    ingested_note,
    write_size_attrs,
)
from observatory.store.lazy import (
    LazyArray,
    StoredArray,
    analysis_lazy_arrays,
    lazy_arrays,
    read_rows,
    resolved,
)
from observatory.store.ledger import (
    read_all_analyses,
    recorded_digests,
    step_coordinates,
    verify_checkpoint,
    verify_checkpoints,
)
from observatory.store.lock import RunLock
from observatory.store.paths import location
from observatory.store.reader import FamilyStore, RunReader
from observatory.store.results import (
    ANALYSIS,
    ATTRIBUTION,
    DYNAMICS,
    AnalysisWriter,
    ResultKind,
    analyses,
    analysis_arrays,
    analysis_group,
    analysis_parameters,
    read_results,
)
from observatory.store.writer import (
    ENCODING_COPIES,
    FILE_BLOCK,
    MAX_BUFFER_BYTES,
    RunWriter,
    buffer_slots,
    disk_bound,
    writer_memory,
)

__all__ = [
    "ATTRS_KEY",
    "ENCODING_COPIES",
    "FILE_BLOCK",
    "MAX_BUFFER_BYTES",
    "MOMENTS",
    "SCHEMA_VERSION",
    "STEP_RECORDS",
    "WRITE_PIECE",
    "ANALYSIS",
    "ATTRIBUTION",
    "DYNAMICS",
    "AnalysisWriter",
    "Checkpoint",
    "FamilyStore",
    "LazyArray",
    "RunLock",
    "RunReader",
    "ResultKind",
    "RunWriter",
    "StepRecord",
    "StoredArray",
    "analyses",
    "analysis_arrays",
    "analysis_group",
    "analysis_lazy_arrays",
    "analysis_parameters",
    "read_results",
    "buffer_slots",
    "create_family",
    "ingested_note",
    "lazy_arrays",
    "location",
    "read_all_analyses",
    "read_rows",
    "recorded_digests",
    "resolved",
    "state_digest",
    "step_coordinates",
    "verify_checkpoint",
    "verify_checkpoints",
    "weights_digest",
    "write_size_attrs",
    "disk_bound",
    "writer_memory",
]
