"""The interactive report page: plotly, self-contained, rendered by a real browser."""

import re
import shutil
import subprocess

import pytest

from observatory.report import interactive, write_report
from observatory.report.summary import summarize
from tests.report.test_summary import synthetic_results

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("interactive")
    write_report(synthetic_results(), out)
    return out / "report_interactive.html"


def test_page_embeds_plotly_and_shows_head_step_and_value_on_hover(page):
    text = page.read_text()
    assert "<script src=" not in text  # plotly.js is inline, never fetched
    # loss, induction heatmaps, copying heatmaps, emergence, ICL
    assert text.count("Plotly.newPlot") == 5
    hover = r"head %{y}\u003cbr\u003estep %{x}\u003cbr\u003einduction_score %{z:.3f}"
    assert hover in text  # plotly escapes "<" in the embedded JSON


def test_transformer_lens_scores_only_when_asked():
    ds = synthetic_results()
    ds["tl_induction_score"] = ds["induction_score"] * 0.5
    result = summarize(ds)
    assert len(interactive.figures(ds, result)) == 5
    titles = [f.layout.title.text for f in interactive.figures(ds, result, transformer_lens=True)]
    assert "Induction score, TransformerLens convention of every head over training" in titles


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_page_renders_offline_in_headless_chromium(page, tmp_path):
    common = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--proxy-server=127.0.0.1:9",  # any network request would fail
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=15000",
        "--window-size=1400,2400",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=300
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console  # no errors, no warnings
    assert dom.stdout.count('class="plot-container plotly"') == 5  # every figure drew
    assert len(re.findall(r'class="hm"', dom.stdout)) == 2 * 3  # heatmap per seed x 2 scores
    shot = tmp_path / "interactive.png"
    taken = subprocess.run(
        [*common, f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert taken.returncode == 0 and shot.read_bytes().startswith(b"\x89PNG")
    assert shot.stat().st_size > 50_000  # plots, not a blank page
