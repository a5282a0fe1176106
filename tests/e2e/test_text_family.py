"""The natural-text pipeline end to end: tokenize -> train -> analyze -> report, shortened."""

import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

import observatory as obs

ROOT = Path(__file__).resolve().parents[2]


def observatory(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "observatory.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def shortened_recipe(tmp_path: Path) -> Path:
    """runs/text.toml on one stdlib package, one seed, 100 steps: the same mechanics, quickly."""
    text = (ROOT / "runs" / "text.toml").read_text()
    spec = tomllib.loads(text)
    assert spec["data"]["paths"] == ["{stdlib}"] and spec["data"]["tokenizer"] == "bpe"
    text = text.replace('paths = ["{stdlib}"]', 'paths = ["{stdlib}/json", "{stdlib}/email"]')
    text = text.replace("vocab_size = 1024", "vocab_size = 512")
    text = text.replace("init = [0, 1, 2]", "init = [0]").replace("data = [0, 1, 2]", "data = [0]")
    text = text.replace("steps = 60000", "steps = 100").replace("every = 500", "every = 50")
    text = text.replace('store_path = "store/text.zarr"', f'store_path = "{tmp_path / "t.zarr"}"')
    path = tmp_path / "text.toml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_tokenize_train_analyze_report_on_natural_text(tmp_path):
    recipe = shortened_recipe(tmp_path)
    first = observatory("tokenize", str(recipe), "--no-progress", cwd=ROOT)
    assert "tokens in" in first and "token cache:" in first
    assert "already in the cache" in observatory("tokenize", str(recipe), "--no-progress", cwd=ROOT)
    observatory("train", str(recipe), "--no-progress", cwd=ROOT)
    store = tmp_path / "t.zarr"

    job = (ROOT / "analyses" / "text.toml").read_text()
    job = job.replace('store = "store/text.zarr"', f'store = "{store}"')
    job = job.replace("n_sequences = 64", "n_sequences = 16")
    (tmp_path / "job.toml").write_text(job)
    observatory("analyze", str(tmp_path / "job.toml"), "--no-progress", cwd=ROOT)
    observatory("report", str(store), "--out", str(tmp_path / "report"), cwd=ROOT)

    tokenizer = obs.tokenizer(store)
    assert tokenizer.bos_token_id == 0 and len(tokenizer) <= 512
    assert tokenizer.decode(tokenizer.encode("def main():")) == "def main():"
    for size in ("l2-d64", "l1-d64"):
        ds = obs.open_family(store, size=size)
        assert int(ds["step"][-1]) == 100
        scores = ds["induction_score"].values
        assert np.isfinite(scores).all() and scores.shape[-2:] == (int(size[1]), 4)
    # the batch of a step is windows of the packed corpus, ids below the vocabulary
    batch = obs.batch_at(store, size="l2-d64", seed=0, step=0)
    assert batch.shape == (8, 128) and int(batch.max()) < 512
    html = (tmp_path / "report" / "report.html").read_text()
    assert "l1-d64" in html and "l2-d64" in html
