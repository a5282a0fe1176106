"""Tokenizers of text corpora: bytes, a byte-level BPE trained on the corpus, or a loaded one.

Conventions, the same for every tokenizer: token 0 is BOS, EOS and padding at once (the models'
``BOS_TOKEN``; in Pythia's tokenizer and in the BPE trained here it is ``<|endoftext|>``).  A
loaded tokenizer must have a special token at id 0.  For ``bytes``, each UTF-8 byte is its own
token, so id 0 is also the NUL byte, which text does not contain.

A Hugging Face tokenizer is kept as its JSON (``tokenizer.json``): the exact text that the
corpus fingerprint covers and that the store records, so a family decodes with the tokenizer it
was trained with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from observatory.errors import DataError
from observatory.models import BOS_TOKEN

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"
# Recorded with every text family: which ids play which part.
CONVENTIONS = {"bos_id": BOS_TOKEN, "eos_id": BOS_TOKEN, "pad_id": BOS_TOKEN}
BYTES_VOCAB = 256


@dataclass(frozen=True)
class TextTokenizer:
    """A corpus tokenizer: ``bytes``, or a Hugging Face tokenizer given by its JSON."""

    kind: Literal["bytes", "bpe", "file"]
    json: str | None = None  # tokenizer.json text; None for bytes

    @cached_property
    def hf(self) -> Tokenizer:
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.json)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return BYTES_VOCAB if self.json is None else self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's token ids (int64), without special tokens (the corpus adds EOS)."""
        if self.json is None:
            return [np.frombuffer(t.encode(), dtype=np.uint8).astype(np.int64) for t in texts]
        encoded = self.hf.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encoded]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (special tokens kept, so document boundaries stay visible)."""
        if self.json is None:
            return bytes(np.asarray(ids, dtype=np.uint8)).decode("utf-8", errors="replace")
        return self.hf.decode(list(map(int, ids)), skip_special_tokens=False)


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids (``<|endoftext|>`` at id 0) on ``texts``.

    Deterministic: the same texts in the same order and vocabulary size give a byte-identical
    ``tokenizer.json`` (merges are chosen by count, ties broken by the pair itself).

    Raises
    ------
    DataError
        If ``vocab_size`` cannot hold the 256 byte tokens and ``<|endoftext|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < BYTES_VOCAB + 1:
        raise DataError(
            f"model.vocab_size: a byte-level BPE needs at least {BYTES_VOCAB + 1} tokens "
            f"(256 bytes and {END_OF_TEXT}), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],  # first, so it gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer("bpe", tokenizer.to_str())


def load_tokenizer(path: Path) -> TextTokenizer:
    """Load a ``tokenizer.json``, or the one inside a tokenizer folder.

    Raises
    ------
    DataError
        One line naming the file, if it does not load or has no special token at id 0.
    """
    from tokenizers import Tokenizer

    file = path / "tokenizer.json" if path.is_dir() else path
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust errors have no common Python type
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"{file}: not a tokenizer that Hugging Face tokenizers loads ({reason})"
        ) from None
    special = tokenizer.get_added_tokens_decoder().get(BOS_TOKEN)
    if special is None or not special.special:
        raise DataError(
            f"{file}: id {BOS_TOKEN} must be a special token (BOS/EOS/padding, as "
            f"{END_OF_TEXT} in Pythia's tokenizer), got {tokenizer.id_to_token(BOS_TOKEN)!r}"
        )
    return TextTokenizer("file", tokenizer.to_str())


def transformers_tokenizer(json: str, **options: object) -> PreTrainedTokenizerFast:
    """A ``transformers`` tokenizer of a stored ``tokenizer.json``, with BOS/EOS/pad = id 0
    (``options``: further keyword arguments of ``PreTrainedTokenizerFast``)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer.from_str(json)
    special = tokenizer.id_to_token(BOS_TOKEN)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=special,
        eos_token=special,
        pad_token=special,
        **options,
    )
