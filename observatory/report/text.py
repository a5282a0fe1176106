"""Text on the report of a text family: held-out windows and the tokens that gain most.

The analyses store per-token losses at one position per held-out window only (for the PCA), so
the tokens that gain most across the loss bump are scored here: the held-out windows of the
analysis job (its ``[held_out]`` seed and count, recorded with the ``token_loss`` results)
through two checkpoints of one seed, the last
one at or before the bump's start and the first one at or after its end (the first and last
checkpoints where a seed has no bump).  Only positions from the ICL score's early position on
are ranked, so that each token has some context to learn from.  Probe sequences are random
tokens and are not shown.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from observatory.errors import StoreError
from observatory.jobs.job_spec import HeldOutSpec
from observatory.report.summary import head_label

N_WINDOWS = 16  # held-out windows scored (two forward passes each)
N_SHOWN = 4  # held-out windows shown as text
N_GAINS = 12  # rows of the table
CONTEXT_TOKENS = 12  # tokens of context shown before a token


@dataclass(frozen=True, eq=False)
class TextExamples:
    """What the report shows as text.

    Attributes
    ----------
    held_out
        The first held-out windows, decoded (BOS/EOS as the tokenizer writes them).
    gains
        The held-out tokens whose loss drops most between ``before`` and ``after``: columns
        ``context`` (the text before the token), ``token``, ``loss_before``, ``loss_after``,
        ``gain`` (nats) and ``in_context`` (the token already occurs earlier in its window:
        what an induction head can copy).
    seed, before, after
        The seed and the two checkpoint steps compared.
    tokens
        Each token of the first held-out window, decoded on its own.
    head, pattern
        A head (``L<layer>H<head>``) and its attention on the first held-out window at step
        ``after``: ``pattern[query_pos, key_pos]``.
    """

    held_out: list[str]
    gains: pd.DataFrame
    seed: int
    before: int
    after: int
    tokens: list[str]
    head: str
    pattern: np.ndarray


def text_examples(
    store: str,
    *,
    size: str,
    seed: int,
    before: int,
    after: int,
    held_out: HeldOutSpec,
    head: tuple[int, int] = (0, 0),
) -> TextExamples | None:
    """The held-out text and the tokens that gain most from step ``before`` to ``after``.

    ``before`` and ``after`` are committed checkpoints of the run (``store``, ``size``,
    ``seed``); ``held_out`` says which windows the analyses held out; ``head`` (layer, head)
    is the head whose attention on the first window is kept.

    Returns
    -------
    TextExamples or None
        None if the family's corpus is not text (synthetic tokens, token files without a
        tokenizer, ingested checkpoints).
    """
    from observatory.analysis.heads import attention_patterns
    from observatory.analysis.icl import icl_positions, token_losses
    from observatory.data import recorded_corpus
    from observatory.jobs.analyze import held_out_tokens
    from observatory.query import models_at
    from observatory.query.tokenizer import window_decoder
    from observatory.store import FamilyStore

    family = FamilyStore(store)
    try:
        decode = window_decoder(family)
    except StoreError:
        return None
    windows, _ = held_out_tokens(family.spec, held_out, corpus=recorded_corpus(family))
    windows = windows[:N_WINDOWS]
    losses, pattern = {}, None
    for step, model in models_at(store, size=size, seed=seed, steps=sorted({before, after})):
        losses[step] = token_losses(model, windows)
        if step == after:
            pattern = attention_patterns(model, windows[:1])[head[0], 0, head[1]]
    early, _ = icl_positions(windows.shape[1])
    gain = losses[before] - losses[after]  # gain[:, t]: predicting windows[:, t + 1]
    gain[:, :early] = -np.inf
    order = np.argsort(-gain, axis=None, kind="stable")[:N_GAINS]
    rows = []
    for flat in order:
        window, t = np.unravel_index(flat, gain.shape)
        ids = windows[window]
        rows.append(
            {
                "context": decode(ids[max(0, t + 1 - CONTEXT_TOKENS) : t + 1]),
                "token": decode(ids[t + 1 : t + 2]),
                "loss_before": float(losses[before][window, t]),
                "loss_after": float(losses[after][window, t]),
                "gain": float(gain[window, t]),
                "in_context": bool(np.isin(ids[t + 1], ids[: t + 1])),
            }
        )
    shown = [decode(ids) for ids in windows[:N_SHOWN]]
    tokens = [decode([token]) for token in windows[0]]
    label = head_label(*head)
    return TextExamples(shown, pd.DataFrame(rows), seed, before, after, tokens, label, pattern)


def compared_steps(steps: np.ndarray, row: dict) -> tuple[int, int]:
    """The checkpoints either side of a seed's loss bump (first and last without one)."""
    start, end = row.get("bump_start_step", math.nan), row.get("bump_end_step", math.nan)
    if not (np.isfinite(start) and np.isfinite(end)):
        return int(steps[0]), int(steps[-1])
    before = steps[steps <= start]
    after = steps[steps >= end]
    return (
        int(before[-1] if len(before) else steps[0]),
        int(after[0] if len(after) else steps[-1]),
    )


def text_html(examples: TextExamples, sub: str) -> list[str]:
    """The examples as HTML, every text escaped (a corpus may hold ``<``, ``&``, quotes)."""
    parts = [
        f"<{sub}>Held-out text</{sub}>",
        f"<p class='note'>The first {len(examples.held_out)} held-out windows of the analyses, "
        "decoded with the family's tokenizer.</p>",
    ]
    parts += [f"<pre class='text'>{html.escape(text)}</pre>" for text in examples.held_out]
    parts += [
        f"<{sub}>Held-out tokens that gain most from in-context learning across the bump</{sub}>",
        f"<p class='note'>Seed {examples.seed}: loss (nats) of each held-out token at step "
        f"{examples.before} (before the bump) and step {examples.after} (after it), the tokens "
        "whose loss drops most; in context: the token occurs earlier in its window.</p>",
        "<table><tr><th>context</th><th>token</th><th>loss before</th><th>loss after</th>"
        "<th>gain</th><th>in context</th></tr>",
    ]
    for row in examples.gains.itertuples(index=False):
        parts.append(
            f"<tr><td><code>{html.escape(repr(row.context))}</code></td>"
            f"<td><code>{html.escape(repr(row.token))}</code></td>"
            f"<td>{row.loss_before:.3f}</td><td>{row.loss_after:.3f}</td>"
            f"<td>{row.gain:.3f}</td><td>{'yes' if row.in_context else 'no'}</td></tr>"
        )
    parts.append("</table>")
    return parts
