"""Text on the report of a text family."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from observatory.jobs.job_spec import HeldOutSpec
from observatory.report.text import TextExamples, compared_steps, text_examples, text_html

SIZE = "l2-d16"


def test_text_examples_decode_held_out_windows_and_rank_the_gains(trained_text):
    from observatory.jobs.analyze import held_out_tokens
    from observatory.query.tokenizer import window_decoder

    spec, store, _ = trained_text
    examples = text_examples(
        str(store), size=SIZE, seed=0, before=0, after=8, held_out=HeldOutSpec()
    )
    windows, _ = held_out_tokens(spec, HeldOutSpec())
    decode = window_decoder(store)
    assert examples.held_out == [decode(ids) for ids in windows[:4]]
    assert examples.held_out[0].startswith("<|endoftext|>")
    gains = examples.gains
    assert len(gains) == 12 and list(gains["gain"]) == sorted(gains["gain"], reverse=True)
    assert np.allclose(gains["gain"], gains["loss_before"] - gains["loss_after"])
    texts = "".join(examples.held_out)
    assert all(token in texts for token in gains["token"])
    page = "\n".join(text_html(examples, "h2"))
    assert "gain most from in-context learning" in page
    assert all(html.escape(text) in page for text in examples.held_out)


def test_the_text_is_escaped_on_the_page():
    row = {"context": "if a <b", "token": "&", "loss_before": 2.0, "loss_after": 0.5}
    examples = TextExamples(
        ["print('<b>café & x</b>')"],
        pd.DataFrame([row | {"gain": 1.5, "in_context": True}]),
        0,
        2,
        8,
        ["<b", "&"],
        "L0H1",
        np.eye(2),
    )
    page = "\n".join(text_html(examples, "h3"))
    assert "print(&#x27;&lt;b&gt;café &amp; x&lt;/b&gt;&#x27;)" in page
    assert "<b>" not in page and "&#x27;if a &lt;b&#x27;" in page and "&#x27;&amp;&#x27;" in page


def test_a_token_id_family_has_no_text(trained_tiny):
    _, store = trained_tiny
    examples = text_examples(
        str(store), size=SIZE, seed=0, before=0, after=8, held_out=HeldOutSpec()
    )
    assert examples is None


def test_compared_steps_are_either_side_of_the_bump():
    steps = np.array([0, 2, 4, 8, 16, 24])
    assert compared_steps(steps, {"bump_start_step": 5, "bump_end_step": 12}) == (4, 16)
    assert compared_steps(steps, {"bump_start_step": np.nan, "bump_end_step": np.nan}) == (0, 24)


def test_the_report_of_a_text_family_shows_its_text(trained_text, tmp_path):
    import shutil

    from observatory.jobs.analyze import run_analysis
    from observatory.jobs.job_spec import load_analysis_spec
    from observatory.report import write_report
    from tests.jobs.test_analyze import JOB

    _, trained, _ = trained_text
    store = tmp_path / "text.zarr"
    shutil.copytree(trained, store)
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(store=store))
    run_analysis(load_analysis_spec(job), progress=False)
    write_report(store, tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Held-out text" in page and "gain most from in-context learning" in page
    assert "&lt;|endoftext|&gt;" in page and "<|endoftext|>" not in page
    interactive = (tmp_path / "report" / "report_interactive.html").read_text()
    assert "on held-out text" in interactive
    examples = text_examples(
        str(store), size=SIZE, seed=0, before=0, after=8, held_out=HeldOutSpec(n_sequences=6)
    )
    words = [t for t in examples.tokens if t.strip().isalpha()]
    assert words and all(html.escape(repr(t)) in interactive for t in words)
