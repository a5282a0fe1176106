"""Training corpora and data order.

- ``corpus.py``: :class:`Corpus` (a token stream cut into ``context``-token windows, read by
  random access; the packing rule), :func:`build_corpus`, :func:`stored_corpus`,
  :func:`recorded_corpus`;
- ``order.py``: the data order, :func:`batch_indices` (window indices of each step), and a
  branch's, :class:`BranchOrder`;
- ``synthetic.py``: the induction corpus;
- ``tokenizer.py``: bytes, a byte-level BPE trained on the corpus, or a loaded tokenizer;
- ``sources.py``: token streams of text and token files, and :func:`tokenize`;
- ``cache.py``: the on-disk, content-addressed token cache;
- ``formats.py``: reading documents and token files.
"""

from observatory.data.corpus import (
    Corpus,
    build_corpus,
    data_record,
    recorded_corpus,
    stored_corpus,
)
from observatory.data.order import (
    BRANCH_ORDER_RULE,
    DATA_ORDER_RULE,
    BranchOrder,
    batch_indices,
    data_order_fingerprint,
)

__all__ = [
    "BRANCH_ORDER_RULE",
    "DATA_ORDER_RULE",
    "BranchOrder",
    "Corpus",
    "batch_indices",
    "build_corpus",
    "data_order_fingerprint",
    "data_record",
    "recorded_corpus",
    "stored_corpus",
]
