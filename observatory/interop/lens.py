"""TransformerLens models of stored checkpoints, for every architecture.

TransformerLens 4 replaced ``HookedTransformer`` by ``TransformerBridge``, which wraps a
Hugging Face model in hook points and TransformerLens names (``blocks.1.attn.hook_pattern``,
``W_Q[layer, head, d_model, d_head]``).  GPT-NeoX has an architecture adapter in
TransformerLens; an architecture without one declares its own (``lens_adapters``, beside its
model in :mod:`observatory.models`), registered here with TransformerLens's public
``ArchitectureAdapterFactory.register_adapter``.  Every model is wrapped with
``build_bridge_from_module``, TransformerLens's builder for a model already in memory, so the
bridge runs the very weights that :func:`observatory.query.model_at` loads (same logits).

TransformerLens is an optional dependency (``pip install -e ".[tl]"``), imported only here and
only when a function of this module is called.  Supported: ``transformer-lens`` 4.x (tested with
4.3.0); 3.x and older have no ``TransformerBridge`` and are refused with a one-line error.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from observatory.errors import ObservatoryError

INSTALL_HINT = 'pip install -e ".[tl]"  (transformer-lens 4.x)'
MIN_MAJOR = 4


class TransformerLensMissing(ObservatoryError):
    """TransformerLens is not installed, or too old to have ``TransformerBridge``."""


def transformer_lens_at(path: str | Path, *, size: str, seed: int, step: int) -> Any:
    """A TransformerLens model of one run with its weights at checkpoint ``step``.

    Parameters
    ----------
    path, size, seed, step
        The run and a committed checkpoint step, as :func:`observatory.query.model_at` takes
        them.

    Returns
    -------
    transformer_lens.model_bridge.TransformerBridge
        In eval mode, raw weights (no LayerNorm folding), so its logits equal those of
        :func:`observatory.query.model_at` at the same step; ``run_with_cache``, hooks,
        ``W_Q``/``W_O`` (``[layer, head, ...]``) and ``detect_head`` work as on any
        TransformerLens model.  A family with a text tokenizer (a BPE or a loaded one) has it:
        ``model.to_tokens("def main(")`` is BOS (token 0) and the tokenizer's ids.  A family of
        token ids (synthetic, byte-level text, token files without a tokenizer) gets a
        tokenizer that names token ``i`` ``"<i>"`` (token 0, ``"<0>"``, is the BOS), so
        ``model.to_tokens("<5> <9>")`` gives ``[[0, 5, 9]]``.

    Raises
    ------
    StoreError
        If the store, size, seed or checkpoint does not exist.
    TransformerLensMissing
        If TransformerLens 4.x is not installed (the message says how to install it).

    Examples
    --------
    >>> model = obs.transformer_lens_at("store/induction.zarr", size="l2-d64", seed=0, step=512)
    >>> logits, cache = model.run_with_cache(tokens)
    >>> cache["blocks.1.attn.hook_pattern"]  # [batch, head, query_pos, key_pos]
    """
    from observatory.query import model_at
    from observatory.store import FamilyStore

    text = FamilyStore(path).attrs.get("data", {}).get("tokenizer")
    return bridge(
        model_at(path, size=size, seed=seed, step=step),
        name=f"{path}:{size}/seed{seed}",
        tokenizer=text_tokenizer(text) if text else None,
    )


def bridge(model: Any, *, name: str = "observatory", tokenizer: Any = None) -> Any:
    """Wrap an in-memory observatory model (of any architecture) in a TransformerBridge.

    The bridge takes ``model`` over (its submodules are replaced by bridge components): pass a
    model you do not use otherwise.

    Parameters
    ----------
    model
        A model from :func:`observatory.query.model_at` (or ``ModelSpec.build``).
    name
        Recorded as the bridge's ``cfg.model_name``.
    tokenizer
        The family's text tokenizer (:func:`observatory.query.tokenizer`); by default the token
        ids' names (:func:`token_names_tokenizer`).

    Returns
    -------
    transformer_lens.model_bridge.TransformerBridge
    """
    from observatory.models.registry import of_config

    sources = _transformer_lens().model_bridge.sources
    declared = of_config(model.config)
    _register_adapters(declared.name)
    wrapped = sources.build_bridge_from_module(
        model.eval(),
        declared.lens_name(model.config),
        hf_config=model.config,
        tokenizer=tokenizer or token_names_tokenizer(model.config.vocab_size),
        model_name=name,
    )
    # Every sequence of the families starts with the BOS token (TransformerLens's GPT-NeoX
    # adapter defaults to no BOS, as Pythia was trained).
    wrapped.cfg.default_prepend_bos = True
    return wrapped.eval()


def token_names_tokenizer(vocab_size: int) -> Any:
    """A tokenizer whose words are the token ids: ``"<0> <5> <9>"`` is ``[0, 5, 9]``.

    The families have no text tokenizer (synthetic tokens, or bytes); this one lets
    TransformerLens's string-based helpers (``to_tokens``, ``to_str_tokens``, ``detect_head``)
    work.  Token 0 is the BOS token; it is not added by the tokenizer itself, so
    TransformerLens prepends it where its ``prepend_bos`` setting says so.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(vocab_size)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=words,
        bos_token="<0>",
        eos_token="<0>",
        add_bos_token=True,
        name_or_path="observatory-token-ids",
    )


def text_tokenizer(json: str) -> Any:
    """A family's text tokenizer (its ``tokenizer.json`` text) as TransformerLens takes it.

    As :func:`token_names_tokenizer`, it does not add BOS itself but declares
    ``add_bos_token`` (TransformerLens otherwise reloads the tokenizer by name), so
    TransformerLens prepends token 0 where its ``prepend_bos`` setting says so.
    """
    from observatory.data.tokenizer import transformers_tokenizer

    return transformers_tokenizer(json, add_bos_token=True, name_or_path="observatory-text")


def _transformer_lens() -> Any:
    """The ``transformer_lens`` package, or a one-line error saying how to install it."""
    try:
        import transformer_lens
        import transformer_lens.model_bridge.sources  # noqa: F401
    except ImportError:
        raise TransformerLensMissing(
            f"TransformerLens is not installed; install it with: {INSTALL_HINT}"
        ) from None
    from importlib.metadata import version

    found = version("transformer-lens")
    if int(found.split(".")[0]) < MIN_MAJOR:
        raise TransformerLensMissing(
            f"transformer-lens {found} has no TransformerBridge; install 4.x: {INSTALL_HINT}"
        )
    return transformer_lens


@cache
def _register_adapters(name: str) -> None:
    """Register architecture ``name``'s TransformerLens adapters, once per process."""
    from transformer_lens.factories.architecture_adapter_factory import (
        ArchitectureAdapterFactory,
    )

    from observatory.models.registry import architecture

    adapters = architecture(name).lens_adapters
    for lens_name, adapter in (adapters() if adapters else {}).items():
        ArchitectureAdapterFactory.register_adapter(lens_name, adapter)
