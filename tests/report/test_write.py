"""The report: PNG figures, one self-contained HTML page and the summary tables."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from observatory.cli import main
from observatory.report import FIGURES, write_report
from observatory.report.figures import heads, losses
from observatory.report.summary import summarize
from observatory.report.write import _section
from tests.report.test_summary import analysed_copy, synthetic_results, with_causal_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return out, write_report(synthetic_results(), out)


# the synthetic results have no tl_* scores, ablations, attention patterns, LLC estimates,
# branches, control size, circuits, per-token losses or store to read attributions and
# training dynamics from
OPTIONAL = {
    "attribution.png",
    "dynamics.png",
    "induction_heatmaps_tl.png",
    "head_ablation.png",
    "attention_patterns.png",
    "llc.png",
    "branches.png",
    "loss_against_control.png",
    "circuits.png",
    "transitions.png",
    "universal_transitions.png",
}
DRAWN = set(FIGURES) - OPTIONAL


def test_report_writes_every_figure_and_table(report):
    out, files = report
    names = [path.name for path in files]
    assert names[:2] == ["report.html", "report_interactive.html"]
    assert set(names) == {
        "report.html",
        "report_interactive.html",
        *DRAWN,
        "summary.csv",
        "summary_across_seeds.csv",
        "summary.json",
    }
    assert all(path.parent == out and path.stat().st_size > 0 for path in files)
    for name in DRAWN:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    per_seed = pd.read_csv(out / "summary.csv", index_col="seed")
    assert list(per_seed["best_head"]) == ["L1H2", "L1H0", "L1H3"]
    across = pd.read_csv(out / "summary_across_seeds.csv", index_col="quantity")
    assert across.loc["emergence_midpoint_step", "n"] == 3
    assert across.loc["emergence_midpoint_step", "ci_method"] == "t"
    assert json.loads((out / "summary.json").read_text())["n_seeds"] == 3


def test_html_is_self_contained_with_images_and_tables(report):
    out, _ = report
    page = (out / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == len(DRAWN)
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert page.count("<table") == 3  # per seed, across seeds, heads matched across seeds
    assert "emergence midpoint step" in page and "L1H2, L1H1" in page
    assert "t-interval" in page and "final loss: mean training loss of the last 10" in page


def test_legends_stay_outside_the_data_and_name_only_what_is_drawn(report):
    flat = synthetic_results()
    flat["loss"] = flat["loss"] * 0 + 2.0  # no bump anywhere
    section = _section(flat, include_incomplete=False, transformer_lens=False)
    strict = dataclasses.replace(section, result=summarize(flat, threshold=0.99))  # none forms
    icl = losses.icl_scores(strict)
    assert "shaded" not in icl.axes[0].get_title()
    pca = losses.loss_pca_trajectories(strict)
    labels = [text.get_text() for text in pca.axes[0].get_legend().get_texts()]
    assert "emergence midpoint" not in labels and "first checkpoint" in labels
    emergence = heads.induction_emergence(section)
    for figure in (icl, pca, emergence):
        figure.canvas.draw()
        ax = figure.axes[0] if figure is not pca else pca.axes[0]
        legend = ax.get_legend().get_window_extent()
        assert not legend.overlaps(ax.get_window_extent())


def test_cli_report_of_a_store(trained_tiny, tmp_path, capsys):
    _, trained = trained_tiny
    assert main(["report", str(trained), "--out", str(tmp_path / "none")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "run `observatory analyze` first" in error
    store = analysed_copy(trained, tmp_path / "tiny.zarr")
    assert main(["report", str(store), "--out", str(tmp_path / "report"), "--size", "l2-d16"]) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed and "loss_pca.png" in printed
    assert "report_interactive.html" in printed
    page = (tmp_path / "report" / "report.html").read_text()
    assert "No attribution stored" in page and f"observatory attribute {store} --size" in page


CAUSAL_FIGURES = ("head_ablation.png", "attention_patterns.png")


def test_causal_figures_are_drawn_when_the_store_has_them(report, tmp_path):
    _, files = report
    assert not set(CAUSAL_FIGURES) & {path.name for path in files}  # not without the data
    names = {path.name for path in write_report(with_causal_results(synthetic_results()), tmp_path)}
    assert set(CAUSAL_FIGURES) <= names
    for name in CAUSAL_FIGURES:
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)
    page = (tmp_path / "report.html").read_text()
    assert "Head ablation" in page and "Attention patterns across the phase change" in page


def with_circuits(ds):
    """``ds`` plus circuit norms and effective ranks: the planted induction heads' OV circuits
    grow and lose rank as their induction scores rise."""
    rise = ds["induction_score"] - 0.04  # [seed, step, layer, head]
    return ds.assign(
        ov_norm=1.0 + 3.0 * rise,
        qk_norm=2.0 + 0.0 * rise,
        ov_effective_rank=4.0 - 2.5 * rise,
        qk_effective_rank=3.0 + 0.0 * rise,
    )


def test_circuit_figure_draws_the_induction_and_previous_token_heads(report):
    _, files = report
    assert "circuits.png" not in {path.name for path in files}  # not without the data
    ds = with_circuits(synthetic_results())
    ds["qk_effective_rank"][0, :3, 1, 2] = np.nan  # a zero QK circuit at the first checkpoints
    section = _section(ds, include_incomplete=False, transformer_lens=False)
    drawn = heads.circuit_trajectories(section)
    norm, rank = (ax for ax in drawn.axes[:2])
    assert norm.get_title(loc="left") == "seed 0: induction head L1H2, previous-token head L0H0"
    assert (norm.get_ylabel(), rank.get_ylabel()) == ("Frobenius norm", "effective rank")
    lines = {line.get_label(): line for line in rank.get_lines()}
    ov = lines["induction head, OV"]
    assert np.allclose(ov.get_ydata(), ds["ov_effective_rank"].sel(seed=0, layer=1, head=2))
    assert len(lines["induction head, QK"].get_xdata()) == ds.sizes["step"] - 3
    assert "previous-token head, QK" in lines and "induction emergence" in lines
    assert any(patch.get_label() == "loss bump" for patch in norm.patches)  # the bump shaded
    assert "Roy & Vetterli" in FIGURES["circuits.png"].caption


def test_llc_figure_is_drawn_when_the_store_has_estimates(report, tmp_path):
    _, files = report
    assert "llc.png" not in {path.name for path in files}
    ds = synthetic_results()
    steps = ds["step"].values
    llc = np.log1p(steps)[None, :] * np.array([1.0, 1.2, 0.9])[:, None]  # [seed, step]
    trace = llc[..., None] + np.linspace(0, 0.1, 20)  # [seed, step, sgld_step]
    ds = ds.assign(
        llc=(("seed", "step"), llc),
        llc_std=(("seed", "step"), 0.1 * llc),
        llc_loss_trace=(("seed", "step", "sgld_step"), trace),
    )
    assert "llc.png" in {path.name for path in write_report(ds, tmp_path)}
    assert (tmp_path / "llc.png").read_bytes().startswith(PNG_MAGIC)
    assert "Local learning coefficient" in (tmp_path / "report.html").read_text()


def test_report_of_a_store_with_an_untrained_seed(trained_tiny, tmp_path, capsys):
    _, trained = trained_tiny
    store = analysed_copy(trained, tmp_path / "tiny.zarr", untrained=(1,))
    out = tmp_path / "report"
    assert main(["report", str(store), "--out", str(out)]) == 0
    per_seed = pd.read_csv(out / "summary.csv", index_col="seed")
    assert per_seed.loc[1, "left_out"] == "not trained" and per_seed.loc[0, "best_head"] == "L1H0"
    assert "not trained" in (out / "report.html").read_text()
    assert main(["report", str(store), "--out", str(tmp_path / "one"), "--seeds", "0"]) == 0
    assert pd.read_csv(tmp_path / "one" / "summary.csv")["seed"].tolist() == [0]
    capsys.readouterr()


def test_a_store_with_two_sizes_gets_one_page_with_a_section_per_size(tmp_path, capsys):
    from observatory.spec import load_run_spec
    from observatory.train import train_family
    from tests.conftest import TINY_TOML, write_spec

    second = '[[model.sizes]]\nname = "l2-d8"\nn_layers = 2\nd_model = 8\nn_heads = 2\n'
    second += "n_positions = 16\n\n[data]"
    spec = load_run_spec(write_spec(tmp_path, TINY_TOML.replace("[data]", second, 1)))
    trained = train_family(spec, store=tmp_path / "two.zarr", progress=False)
    store = analysed_copy(trained, tmp_path / "analysed.zarr")
    out = tmp_path / "report"
    assert main(["report", str(store), "--out", str(out)]) == 0
    capsys.readouterr()
    for size in ("l2-d16", "l2-d8"):
        assert (out / size / "induction_heatmaps.png").read_bytes().startswith(PNG_MAGIC)
        assert pd.read_csv(out / size / "summary.csv")["seed"].tolist() == [0, 1]
    sizes = pd.read_csv(out / "sizes.csv")
    assert sizes["size"].tolist() == ["l2-d16", "l2-d8"]
    assert sizes["seeds with an induction head"].tolist() == ["2 of 2", "2 of 2"]
    page = (out / "report.html").read_text()
    assert "Sizes compared" in page and page.count("<h2>Circuit formation in") == 2
    assert main(["report", str(store), "--out", str(tmp_path / "one"), "--sizes", "l2-d8"]) == 0
    assert (tmp_path / "one" / "induction_heatmaps.png").exists()


USER_MODULE = '''\
from matplotlib.figure import Figure

import observatory as obs
from observatory.analysis import attention_patterns
from observatory.report import figure


@obs.analysis(variables={"bos_attention": ("layer", "head")})
def bos_attention(model, data):
    """Mean attention to the first token on the probe."""
    patterns = attention_patterns(model, data.probe_tokens)  # [layer, batch, head, q, k]
    return {"bos_attention": patterns[..., 0].mean(axis=(1, 3))}


@figure("bos_attention.png", title="Attention to the first token")
def bos_attention_figure(section):
    """Mean attention of every head to the first token of the probe, over training."""
    ds = section.ds
    if "bos_attention" not in ds:
        return None
    image = Figure()
    ax = image.subplots()
    for layer in ds["layer"].values:
        for head in ds["head"].values:
            values = ds["bos_attention"].sel(layer=layer, head=head).mean("seed")
            ax.plot(ds["step"], values, label=f"L{layer}H{head}")
    ax.legend()
    return image
'''

EVERY_ANALYSIS = """\
store = "{store}"
analyses = [{analyses}, "mine.py:bos_attention"]
steps = {steps}

[probe]
seed = 7
n_sequences = 3

[held_out]
n_sequences = 6

[llc]
chains = 1
draws = 2
batch_size = 2

[execution]
workers = 1
"""


@pytest.fixture(scope="module")
def every_analysis(trained_tiny, tmp_path_factory):
    """A copy of the trained store analysed by every built-in and by a user's analysis, whose
    module (beside the job) also declares a report figure."""
    import shutil

    from observatory.analysis.builtins import BUILTINS
    from observatory.jobs.analyze import run_analysis
    from observatory.jobs.job_spec import load_analysis_spec
    from observatory.store import FamilyStore

    _, trained = trained_tiny
    directory = tmp_path_factory.mktemp("every_analysis")
    store = directory / "tiny.zarr"
    shutil.copytree(trained, store)
    steps = FamilyStore(store).run("l2-d16", 0).steps()
    (directory / "mine.py").write_text(USER_MODULE)
    job = directory / "job.toml"
    analyses = ", ".join(f'"{name}"' for name in BUILTINS)
    chosen = [int(steps[0]), int(steps[len(steps) // 2]), int(steps[-1])]
    job.write_text(EVERY_ANALYSIS.format(store=store, analyses=analyses, steps=chosen))
    run_analysis(load_analysis_spec(job), progress=False)
    return store, directory / "mine.py"


def test_every_variable_a_builtin_writes_is_loaded(every_analysis):
    from observatory.analysis.builtins import BUILTINS
    from observatory.report import load_results

    store, _ = every_analysis
    ds = load_results(store)
    for found in BUILTINS.values():
        for variable in found.declared():
            assert variable in ds, (found.name, variable)
            assert ds[variable].attrs["analysis"] == found.name
            assert bool(ds[variable].notnull().any()), (found.name, variable)


def test_transformer_lens_heatmap_of_a_store_with_head_scores(every_analysis, tmp_path, capsys):
    store, _ = every_analysis
    out = tmp_path / "tl"
    assert main(["report", str(store), "--out", str(out), "--transformer-lens"]) == 0
    capsys.readouterr()
    assert (out / "induction_heatmaps_tl.png").read_bytes().startswith(PNG_MAGIC)
    assert "Induction score, TransformerLens convention" in (out / "report.html").read_text()


def test_transformer_lens_without_tl_scores_is_refused_in_one_line(trained_tiny, tmp_path, capsys):
    _, trained = trained_tiny
    store = analysed_copy(trained, tmp_path / "tiny.zarr")  # no tl_* scores
    out = tmp_path / "report"
    assert main(["report", str(store), "--out", str(out), "--transformer-lens"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "tl_induction_score" in error
    assert not out.exists()  # refused before writing anything


def test_a_new_analysis_and_figure_from_one_user_module(every_analysis, tmp_path):
    from observatory.report import load_results

    store, module = every_analysis
    ds = load_results(store)
    assert ds["bos_attention"].dims == ("seed", "step", "layer", "head")
    assert ds["bos_attention"].attrs["analysis"] == "bos_attention"
    files = write_report(store, tmp_path, figures=[module])
    assert tmp_path / "bos_attention.png" in files
    assert (tmp_path / "bos_attention.png").read_bytes().startswith(PNG_MAGIC)
    page = (tmp_path / "report.html").read_text()
    assert '<figure id="bos_attention"><h2>Attention to the first token</h2>' in page
    assert "Mean attention of every head to the first token of the probe" in page
    assert "bos_attention.png" not in {path.name for path in write_report(store, tmp_path)}


def test_figure_modules_are_checked(tmp_path):
    from observatory.errors import SpecError

    with pytest.raises(SpecError, match="no such figure module"):
        write_report(synthetic_results(), tmp_path, figures=[tmp_path / "missing.py"])
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(SpecError, match="defines no figure"):
        write_report(synthetic_results(), tmp_path, figures=[empty])
    clash = tmp_path / "clash.py"
    clash.write_text(
        "from observatory.report import figure\n\n\n"
        '@figure("loss_curves.png", title="t", caption="c")\n'
        "def mine(section):\n    return None\n"
    )
    with pytest.raises(SpecError, match="two report figures write 'loss_curves.png'"):
        write_report(synthetic_results(), tmp_path, figures=[clash])
