"""The report: PNG figures, one self-contained HTML page and the summary tables."""

import json

import pandas as pd
import pytest

from observatory.cli import main
from observatory.report import FIGURES, OPTIONAL_FIGURES, write_report
from tests.test_analysis_summary import analysed_copy, synthetic_results, with_causal_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return out, write_report(synthetic_results(), out)


def test_report_writes_every_figure_and_table(report):
    out, files = report
    names = [path.name for path in files]
    assert names[0] == "report.html"
    assert set(names) == {
        "report.html",
        *FIGURES,
        "summary.csv",
        "summary_across_seeds.csv",
        "summary.json",
    }
    assert all(path.parent == out and path.stat().st_size > 0 for path in files)
    for name in FIGURES:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    per_seed = pd.read_csv(out / "summary.csv", index_col="seed")
    assert list(per_seed["best_head"]) == ["L1H2", "L1H0", "L1H3"]
    across = pd.read_csv(out / "summary_across_seeds.csv", index_col="quantity")
    assert across.loc["emergence_midpoint_step", "n"] == 3
    assert json.loads((out / "summary.json").read_text())["n_seeds"] == 3


def test_html_is_self_contained_with_images_and_tables(report):
    out, _ = report
    page = (out / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == len(FIGURES)
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert page.count("<table") == 2
    assert "emergence midpoint step" in page and "L1H2, L1H1" in page


def test_cli_report_of_a_store(trained_tiny, tmp_path, capsys):
    _, trained = trained_tiny
    assert main(["report", str(trained), "--out", str(tmp_path / "none")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "run `observatory analyze` first" in error
    store = analysed_copy(trained, tmp_path / "tiny.zarr")
    assert main(["report", str(store), "--out", str(tmp_path / "report"), "--size", "l2-d16"]) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed and "loss_pca.png" in printed
    assert (tmp_path / "report" / "report.html").exists()


def test_causal_figures_are_drawn_when_the_store_has_them(report, tmp_path):
    _, files = report
    assert not set(OPTIONAL_FIGURES) & {path.name for path in files}  # not without the data
    names = {path.name for path in write_report(with_causal_results(synthetic_results()), tmp_path)}
    assert set(OPTIONAL_FIGURES) <= names
    for name in OPTIONAL_FIGURES:
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)
    page = (tmp_path / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == len(FIGURES) + len(OPTIONAL_FIGURES)
    assert "Head ablation" in page and "Attention patterns across the phase change" in page
