"""The circuit-formation summary on synthetic results with a planted phase change."""

import json
import shutil

import numpy as np
import pytest
import xarray as xr
import zarr

from observatory.analysis import variance_split
from observatory.errors import StoreError
from observatory.report.results import load_results, summary
from observatory.report.summary import summarize, token_loss_pca

TOKENS_PER_STEP = 2048
TRAIN_STEPS = np.arange(1000)
CHECKPOINTS = np.union1d([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512], np.arange(0, 1000, 10))
# seed -> (bump start, bump end, its induction heads by peak score as (layer, head, peak))
PLANTED = {
    0: (400, 550, [(1, 2, 0.85), (1, 1, 0.6)]),
    1: (440, 590, [(1, 0, 0.8)]),
    2: (480, 630, [(1, 3, 0.9)]),
    3: (560, 710, [(1, 1, 0.75)]),
}


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def synthetic_results(seeds=(0, 1, 2), *, n_held_out: int = 16) -> xr.Dataset:
    """What ``load_results`` returns for a family whose seeds have the phase change planted.

    Loss: ln 64 until the bump start, a smooth drop to 1.0 by its end; each planted head's
    induction score and the (negated) ICL score rise as a sigmoid centred in the window.
    """
    rng = np.random.default_rng(0)
    direction = rng.normal(0, 1, n_held_out)  # shared: the seeds learn the same tokens
    loss, induction, previous, icl, token_loss, copying, by_position = [], [], [], [], [], [], []
    position = np.arange(63)
    for seed in seeds:
        start, end, heads = PLANTED[seed]
        u = np.clip((TRAIN_STEPS - start) / (end - start), 0, 1)
        drop = np.log(64) - (np.log(64) - 1.0) * u * u * (3 - 2 * u)
        loss.append(drop + rng.normal(0, 0.05, TRAIN_STEPS.size))
        rise = sigmoid((CHECKPOINTS - (start + end) / 2) / 15)  # [step]
        scores = 0.04 + rng.uniform(0, 0.02, (CHECKPOINTS.size, 2, 4))
        for layer, head, peak in heads:
            scores[:, layer, head] += (peak - 0.04) * rise
        induction.append(scores)
        prev = 0.1 + 0.8 * sigmoid((CHECKPOINTS - start + 50) / 20)
        previous.append(np.repeat(prev[:, None, None], 4, axis=2).repeat(2, axis=1))
        icl.append(-0.05 - 1.8 * rise)
        noise = rng.normal(0, 0.05, (CHECKPOINTS.size, n_held_out))
        token_loss.append(4.0 - np.outer(rise, 2 + direction) + noise)
        copying.append(np.where(scores > 0.3, 0.9, 0.1) + rng.uniform(-0.05, 0.05, scores.shape))
        # late positions gain after the phase change; early ones do not
        by_position.append(4.0 - np.outer(rise, 3.0 * position / (position + 8)))
    heads = ("seed", "step", "layer", "head")
    return xr.Dataset(
        {
            "loss": (("seed", "train_step"), np.array(loss)),
            "induction_score": (heads, np.array(induction)),
            "previous_token_score": (heads, np.array(previous)),
            "icl_score": (("seed", "step"), np.array(icl)),
            "token_loss": (("seed", "step", "held_out"), np.array(token_loss)),
            "copying_score": (heads, np.array(copying)),
            "loss_by_position": (("seed", "step", "loss_position"), np.array(by_position)),
        },
        coords={
            "seed": list(seeds),
            "step": CHECKPOINTS,
            "tokens_seen": ("step", CHECKPOINTS * TOKENS_PER_STEP),
            "train_step": TRAIN_STEPS,
        },
        attrs={"store": "synthetic.zarr", "size": "l2-d64", "analysis_parameters": {}},
    )


@pytest.fixture(scope="module")
def planted():
    return synthetic_results()


@pytest.fixture(scope="module")
def result(planted):
    return summarize(planted)


def test_summary_finds_each_seeds_heads_emergence_and_bump(result):
    assert result.threshold == 0.5 and result.threshold_source == "default"
    per_seed = result.per_seed
    assert list(per_seed.index) == [0, 1, 2]
    assert list(per_seed["induction_heads"]) == ["L1H2, L1H1", "L1H0", "L1H3"]
    assert list(per_seed["best_head"]) == ["L1H2", "L1H0", "L1H3"]
    for seed in per_seed.index:
        start, end, _ = PLANTED[seed]
        row = per_seed.loc[seed]
        assert row["emergence_midpoint_step"] == pytest.approx((start + end) / 2, abs=5)
        assert (start + end) / 2 <= row["emergence_crossing_step"] <= (start + end) / 2 + 30
        assert start - 60 <= row["bump_start_step"] <= start + 40
        assert end - 40 <= row["bump_end_step"] <= end + 60
        assert row["bump_start_tokens"] == row["bump_start_step"] * TOKENS_PER_STEP
        assert row["jump_in_bump"]
        assert row["icl_after"] < row["icl_before"] - 1.0  # ICL score becomes more negative
        assert row["final_loss"] == pytest.approx(1.0, abs=0.05)


def test_cross_seed_statistics_name_the_seeds_and_contain_the_mean(result):
    across = result.across_seeds
    midpoints = result.per_seed["emergence_midpoint_step"]
    row = across.loc["emergence_midpoint_step"]
    assert row["n"] == 3 and row["n_missing"] == 0
    assert row["mean"] == pytest.approx(midpoints.mean())
    assert row["std"] == pytest.approx(midpoints.std(ddof=1))
    for name in ("emergence_midpoint_step", "bump_start_step", "bump_end_step"):
        assert across.loc[name, "ci_low"] <= across.loc[name, "mean"] <= across.loc[name, "ci_high"]


def test_summary_text_markdown_and_json(result):
    text = str(result)
    assert "3 seeds" in text and "L1H2, L1H1" in text and "95% CI" in text
    markdown = result.to_markdown()
    assert (
        "| seed |" in markdown
        and sum(line.startswith("|---") for line in markdown.splitlines()) == 2
    )
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["n_seeds"] == 3 and data["per_seed"][1]["best_head"] == "L1H0"
    assert data["across_seeds"]["bump_end_step"]["n"] == 3


def test_threshold_from_the_analysis_job_then_the_argument(planted):
    recorded = planted.copy()
    recorded.attrs = planted.attrs | {"analysis_parameters": {"head_scores": {"threshold": 0.7}}}
    from_job = summarize(recorded)
    assert from_job.threshold == 0.7 and from_job.threshold_source == "analysis job"
    assert from_job.per_seed.loc[0, "induction_heads"] == "L1H2"  # L1H1 peaks at 0.6
    strict = summarize(recorded, threshold=0.95)
    assert strict.threshold_source == "argument"
    assert (strict.per_seed["n_induction_heads"] == 0).all()
    assert strict.per_seed["emergence_midpoint_step"].isna().all()
    assert strict.across_seeds.loc["emergence_midpoint_step", "n_missing"] == 3


def test_a_seed_without_a_bump_is_counted_as_missing(planted):
    flat = planted.copy()
    flat["loss"] = planted["loss"].where(planted["seed"] != 1, 2.0)
    result = summarize(flat)
    assert np.isnan(result.per_seed.loc[1, "bump_start_step"])
    assert result.per_seed["jump_in_bump"].isna()[1]
    assert result.across_seeds.loc["bump_start_step", "n"] == 2
    assert "-" in str(result)


def test_a_bump_hidden_by_batch_noise_shows_against_a_control(planted):
    """Text-like curves: a convex power-law decay, large batch-to-batch noise shared by both
    sizes (the same batches), and a modest extra drop of the 2-layer loss over the window."""
    rng = np.random.default_rng(5)
    steps = TRAIN_STEPS.astype(float)
    shared = 3.0 + 2.0 / (1 + steps / 50) + rng.normal(0, 0.3, (3, steps.size))
    extra = []
    for seed in (0, 1, 2):
        start, end, _ = PLANTED[seed]
        u = np.clip((steps - start) / (end - start), 0, 1)
        extra.append(-0.3 * u * u * (3 - 2 * u) + rng.normal(0, 0.01, steps.size))
    text = planted.copy()
    text["loss"] = (("seed", "train_step"), shared + np.array(extra))
    alone = summarize(text)
    assert alone.per_seed["bump_start_step"].isna().all()  # lost in the noise
    text["control_loss"] = (("seed", "train_step"), shared)
    text["control_loss"].attrs["control"] = "l1-d64"
    against = summarize(text)
    assert "minus that of the control size l1-d64" in against.parameters["bump_signal"]
    for seed in (0, 1, 2):
        start, end, _ = PLANTED[seed]
        row = against.per_seed.loc[seed]
        assert start - 60 <= row["bump_start_step"] <= start + 40
        assert end - 40 <= row["bump_end_step"] <= end + 60
        assert row["jump_in_bump"]
        assert row["bump_loss_drop"] == pytest.approx(0.3, abs=0.1)
    unmatched = text.copy()
    unmatched["control_loss"] = text["control_loss"].where(text["seed"] != 1)
    assert np.isnan(summarize(unmatched).per_seed.loc[1, "bump_start_step"])  # loss alone


def test_missing_analyses_raise_one_clear_line(planted):
    with pytest.raises(StoreError, match=r"'head_scores'.*run `observatory analyze` first"):
        summarize(planted.drop_vars("induction_score"))
    with pytest.raises(StoreError, match="'token_loss'"):
        token_loss_pca(planted.assign(token_loss=planted["token_loss"] * np.nan))


def test_a_seed_without_results_is_reported_and_left_out(planted):
    unanalysed = planted.copy()
    unanalysed["induction_score"] = planted["induction_score"].where(planted["seed"] != 2)
    result = summarize(unanalysed)
    assert result.per_seed.loc[2, "left_out"] == "not analysed"
    row = result.across_seeds.loc["emergence_midpoint_step"]
    assert (row["n"], row["seeds"], row["left_out"]) == (2, "0, 1", "2: not analysed")
    assert "not analysed" in str(result)


def test_an_incomplete_run_is_flagged_and_left_out(planted):
    stopped = planted.assign_coords(complete=("seed", [True, False, True]))
    stopped["loss"] = planted["loss"].where((planted["seed"] != 1) | (planted["train_step"] < 400))
    result = summarize(stopped)
    row = result.per_seed.loc[1]
    assert (row["status"], row["left_out"], row["trained_steps"]) == (
        "incomplete",
        "incomplete",
        400,
    )
    assert row["final_loss"] == pytest.approx(np.log(64), abs=0.05)  # still on the plateau
    final = result.across_seeds.loc["final_loss"]
    assert (final["n"], final["seeds"], final["left_out"]) == (2, "0, 2", "1: incomplete")
    kept = result.per_seed.loc[[0, 2], "final_loss"]
    assert final["mean"] == pytest.approx(kept.mean())
    text = str(result)
    assert "incomplete (incomplete)" in text and "(step 400)" in text
    included = summarize(stopped, include_incomplete=True)
    assert included.across_seeds.loc["final_loss", "n"] == 3
    assert included.per_seed.loc[1, "left_out"] == ""


def test_crossed_init_and_data_seeds_split_the_variance():
    crossed = synthetic_results(seeds=(0, 1, 2, 3)).assign_coords(
        init_seed=("seed", [0, 0, 1, 1]), data_seed=("seed", [5, 6, 5, 6])
    )
    result = summarize(crossed)
    assert list(result.variance.index) == ["emergence_midpoint_step", "final_loss"]
    midpoints = result.per_seed["emergence_midpoint_step"]
    expected = variance_split(midpoints, [0, 0, 1, 1], [5, 6, 5, 6])
    assert result.variance.loc["emergence_midpoint_step", "init_share"] == pytest.approx(
        expected["init_share"]
    )
    assert "2 init x 2 data seeds" in str(result) and "rough" in str(result)
    assert summarize(crossed, seeds=[0, 1, 2]).variance.empty  # no longer crossed


def test_token_loss_pca_is_one_fit_over_every_seed(planted):
    partial = planted.copy()
    partial["token_loss"] = planted["token_loss"].where(planted["step"] != 1000 - 10)
    pca = token_loss_pca(partial)
    assert pca["projection"].dims == ("seed", "step", "component")
    assert pca.sizes == {"seed": 3, "step": CHECKPOINTS.size, "component": 2, "held_out": 16}
    assert np.isnan(pca["projection"].sel(step=990)).all()
    assert np.isfinite(pca["projection"].sel(step=500)).all()
    assert pca["explained_variance_ratio"].values[0] > 0.9  # one planted direction
    # every seed travels along PC1 from one end to the other
    projection = pca["projection"].sel(component=1)
    assert (np.abs(projection.sel(step=980) - projection.sel(step=0)) > 5).all()


def analysed_copy(trained, path, *, threshold: float = 0.4, untrained: tuple[int, ...] = ()):
    """A copy of a trained store with made-up analysis results: head ``L1H<seed>`` forms.

    The seeds ``untrained`` are reset to no committed checkpoints or steps (as a run that
    crashed before its first commit) and are not analysed.
    """
    from observatory.store import ATTRS_KEY, AnalysisWriter, FamilyStore

    shutil.copytree(trained, path)
    for seed in untrained:
        group = zarr.open_group(path / "l2-d16" / f"seed{seed}", mode="r+")
        group.attrs[ATTRS_KEY] = dict(group.attrs[ATTRS_KEY]) | {
            "committed_checkpoints": 0,
            "committed_steps": 0,
            "complete": False,
        }
    family = FamilyStore(path, mode="r+")
    for run in family.runs():
        if run.seed in untrained:
            continue
        reader = family.run(run.size, run.seed)
        steps = reader.steps()
        rise = np.clip(steps / steps[-1], 0, 1)  # [step]
        scores = np.zeros((len(steps), 2, 2))
        scores[:, 1, run.seed] = rise
        results = {
            "head_scores": {"induction_score": scores, "previous_token_score": 1 - scores},
            "icl": {"icl_score": -rise},
            "token_loss": {"token_loss": 3 - np.outer(rise, np.arange(4))},
        }
        for name, variables in results.items():
            shapes = {key: (("layer", "head"), (2, 2)) for key in variables}
            shapes |= {"icl_score": ((), ()), "token_loss": (("held_out",), (4,))}
            writer = AnalysisWriter(
                reader,
                name,
                attrs={"threshold": threshold} if name == "head_scores" else {},
                variables={key: shapes[key] for key in variables},
            )
            writer.append(steps, variables)
            writer.flush()
    return path


def test_summary_of_a_store(trained_tiny, tmp_path):
    _, trained = trained_tiny
    with pytest.raises(StoreError, match="run `observatory analyze` first"):
        summary(trained)
    path = analysed_copy(trained, tmp_path / "tiny.zarr")
    result = summary(path)
    assert result.threshold == 0.4 and result.threshold_source == "analysis job"
    assert result.size == "l2-d16" and list(result.per_seed["best_head"]) == ["L1H0", "L1H1"]
    assert result.store == str(path)
    loaded = load_results(path, size="l2-d16")
    assert loaded["induction_score"].dims == ("seed", "step", "layer", "head")
    with pytest.raises(StoreError, match="no size 'big'"):
        load_results(path, size="big")


def with_causal_results(ds: xr.Dataset, *, n_pos: int = 9) -> xr.Dataset:
    """``ds`` plus planted ablation effects and attention patterns.

    Ablating each seed's best planted head raises the loss most, except in seed 2, where the
    layer-0 head 0 hurts more (the best head ranks second).
    """
    best = {seed: heads[0][:2] for seed, (_, _, heads) in PLANTED.items()}
    effect = np.zeros((ds.sizes["seed"], CHECKPOINTS.size, 2, 4))
    patterns = np.zeros((*effect.shape, n_pos, n_pos))
    for i, seed in enumerate(ds["seed"].values):
        rise = ds["induction_score"].values[i].max(axis=(1, 2))  # [step]
        effect[i, :, best[seed][0], best[seed][1]] = 2.0 * rise
        if seed == 2:
            effect[i, :, 0, 0] = 3.0 * rise
        patterns[i] = np.eye(n_pos)  # attend to self
    return ds.assign(
        repeated_loss_increase=(("seed", "step", "layer", "head"), effect),
        repeated_layer_loss_increase=(("seed", "step", "layer"), effect.sum(axis=-1)),
        attention_pattern=(("seed", "step", "layer", "head", "probe_query", "probe_key"), patterns),
    )


def test_summary_ranks_the_best_head_by_its_ablation_effect(planted):
    per_seed = summarize(with_causal_results(planted)).per_seed
    assert list(per_seed["best_head_ablation_rank"]) == [1, 1, 2]
    assert list(per_seed["best_head_is_top_ablation"]) == [True, True, False]
    assert list(per_seed["top_ablation_head"]) == ["L1H2", "L1H0", "L0H0"]
    assert (per_seed["ablation_step"] == CHECKPOINTS[-1]).all()
    assert "ablation last: top, best (rank)" in str(summarize(with_causal_results(planted)))
    assert "best_head_ablation_rank" not in summarize(planted).per_seed  # without ablations


def test_summary_ranks_ablations_at_the_end_of_the_bump_and_at_the_last_checkpoint(planted):
    ds = with_causal_results(planted)
    # Seed 0: after step 800 a second head duplicates the circuit and takes most of it over.
    effect = ds["repeated_loss_increase"].copy()
    late = effect["step"] > 800
    effect.loc[{"seed": 0, "layer": 1, "head": 1}] = np.where(late, 5.0, 0.0)
    per_seed = summarize(ds.assign(repeated_loss_increase=effect)).per_seed
    first_after = [CHECKPOINTS[CHECKPOINTS >= end][0] for end in per_seed["bump_end_step"]]
    assert list(per_seed["bump_end_ablation_step"]) == first_after
    assert list(per_seed["bump_end_best_head_ablation_rank"]) == [1, 1, 2]
    assert list(per_seed["best_head_ablation_rank"]) == [2, 1, 2]
    assert per_seed.loc[0, "top_ablation_head"] == "L1H1"
    assert per_seed.loc[0, "bump_end_top_ablation_head"] == "L1H2"


def test_summary_of_a_store_without_analyses_says_nothing_was_analysed(trained_tiny):
    from observatory.errors import StoreError

    _, store = trained_tiny
    with pytest.raises(StoreError, match="no results of analysis .*run `observatory analyze`"):
        summary(store)


def test_a_seed_with_no_checkpoints_does_not_stop_the_summary(trained_tiny, tmp_path):
    _, trained = trained_tiny
    path = analysed_copy(trained, tmp_path / "tiny.zarr", untrained=(1,))
    result = summary(path)
    assert result.per_seed.loc[0, "best_head"] == "L1H0"
    assert result.per_seed.loc[1, "left_out"] == "not trained"
    assert result.across_seeds.loc["final_loss", "seeds"] == "0"
    assert summary(path, seeds=[0]).per_seed.index.tolist() == [0]
