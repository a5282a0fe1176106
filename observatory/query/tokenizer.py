"""The tokenizer a family was trained with, from its store."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from observatory.errors import StoreError
from observatory.store import FamilyStore

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The ``transformers`` tokenizer recorded in a text family's store.

    BOS, EOS and padding are all token 0 (``<|endoftext|>`` for a trained BPE).

    Parameters
    ----------
    path
        The family store.

    Raises
    ------
    StoreError
        If the family has no tokenizer: its corpus is token ids (synthetic, byte-level text or
        token files given without a tokenizer).
    """
    from observatory.data.tokenizer import transformers_tokenizer

    family = FamilyStore(path)
    record = family.attrs.get("data", {})
    if not record.get("tokenizer"):
        kind = record.get("tokenizer_kind") or record.get("source", "ingested")
        raise StoreError(
            f"{family.path}: the family's corpus ({kind}) has no tokenizer; its tokens are ids"
            + (" (bytes: bytes(ids).decode())" if kind == "bytes" else "")
        )
    return transformers_tokenizer(record["tokenizer"])


def window_decoder(family: str | Path | FamilyStore) -> Callable[[Sequence[int]], str]:
    """The function that turns a family's token ids into their text.

    Raises
    ------
    StoreError
        If the family's tokens are not text (synthetic, or token files without a tokenizer).
    """
    from observatory.data.tokenizer import TextTokenizer

    family = family if isinstance(family, FamilyStore) else FamilyStore(family)
    record = family.attrs.get("data", {})
    if record.get("tokenizer_kind") == "bytes":
        return TextTokenizer("bytes").decode
    if not record.get("tokenizer"):
        what = record.get("source") or "ingested"
        raise StoreError(f"{family.path}: the family's corpus ({what}) has no tokenizer to decode")
    return TextTokenizer(record["tokenizer_kind"] or "file", record["tokenizer"]).decode
