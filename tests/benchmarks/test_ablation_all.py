"""``benchmarks/ablation.py all`` on real two-step runs of tiny and the pool-adapter recipe (seeds 0, 1): only the
runs that have not finished train, a run of another config is refused, the seed-mean table's mean ± sample
standard deviation matches the hand-computed one, the results file holds the command line, and a failing table
step leaves the old file as it was."""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from statistics import fmean
from typing import Any

import ablation
import pytest

from mllm.config import load_config

SMALL = ["model.llm.arch.num_hidden_layers=1", "train.batch_size=4", "train.micro_batch_size=4",
         "data.test_images=8", "train.log_with=[]"]
RECIPES = ["tiny", "pool_adapter"]
# Scores written into the runs' summaries, so that the spread is not the 0 of four untrained models: (VQA, Acc@0.5).
SCORES = {("tiny", 0): (0.9, 0.8), ("tiny", 1): (0.7, 0.6), ("pool_adapter", 0): (0.5, 0.25),
          ("pool_adapter", 1): (0.8, 0.75)}


def _argv(out: Path, results: Path, *extra: str) -> list[str]:
    sets = [a for o in SMALL for a in ("--set", o)]
    return ["all", "pool_adapter", "--out", str(out), "--seeds", "0", "1", "--steps", "2", *sets,
            "--results", str(results), *extra]


def _score(run_dir: Path, vqa: float, grounding: float) -> None:
    summary = json.loads((run_dir / "train_summary.json").read_text())
    summary["eval"] |= {"vqa_accuracy": vqa, "grounding_accuracy": grounding}
    (run_dir / "train_summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four finished runs, OUT/seed_S/RECIPE, trained as ``_argv`` asks, with :data:`SCORES`."""
    out = tmp_path_factory.mktemp("ablation")
    assert len(ablation.train_missing(out, [0, 1], RECIPES, ["train.steps=2", *SMALL])) == 4
    for (recipe, seed), (vqa, grounding) in SCORES.items():
        _score(out / f"seed_{seed}" / recipe, vqa, grounding)
    return out


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """The run folders ``run.train`` is called for (it still trains)."""
    calls: list[Path] = []
    real = ablation.run.train

    def train(recipe: str, out_dir: Path, overrides: list[str], **kw: Any) -> dict[str, Any]:
        calls.append(out_dir)
        return real(recipe, out_dir, overrides, **kw)

    monkeypatch.setattr(ablation.run, "train", train)
    yield calls


def test_all_trains_only_the_unfinished_runs(finished: Path, tmp_path: Path, trained: list[Path]) -> None:
    out = tmp_path / "runs"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "seed_0" / "pool_adapter")  # never started
    (out / "seed_1" / "tiny" / "train_summary.json").unlink()  # stopped during its evaluation: resumed, re-evaluated
    (out / "seed_1" / "tiny" / "eval" / "predictions.jsonl").write_text("")
    assert ablation.main(_argv(out, tmp_path / "ablation.md")) == 0
    assert trained == [out / "seed_0" / "pool_adapter", out / "seed_1" / "tiny"]
    assert all((out / f"seed_{s}" / r / "train_summary.json").is_file() for s in (0, 1) for r in RECIPES)
    # all's runs checkpoint along the way; the fixture's runs (save_every 0) were not refused for that alone
    saves = {s: load_config(str(out / f"seed_{s}" / "pool_adapter" / "config.yaml")).train.save_every for s in (0, 1)}
    assert saves == {0: ablation.SAVE_EVERY, 1: 0}


def test_a_run_of_another_config_is_refused_before_anything_trains(finished: Path, tmp_path: Path,
                                                                   trained: list[Path],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    argv = _argv(finished, tmp_path / "ablation.md")
    argv[argv.index("--steps") + 1] = "3"
    assert ablation.main(argv) == 2
    assert trained == [] and not (tmp_path / "ablation.md").exists()
    assert f"{finished / 'seed_0' / 'tiny'}: trained with another config (train.steps: 2 there, 3 now)" in \
        capsys.readouterr().err


def test_all_writes_mean_and_spread_over_seeds_with_its_command(finished: Path, tmp_path: Path, trained: list[Path],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results" / "ablation.md"
    days = {datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    assert ablation.main(_argv(finished, results)) == 0
    days.add(datetime.now(timezone.utc).strftime("%Y-%m-%d"))
    text = results.read_text()
    assert trained == [] and capsys.readouterr().out == text + "\n"
    command = next(line for line in text.splitlines() if line.startswith("    python "))
    assert shlex.split(command) == ["python", "benchmarks/ablation.py", *_argv(finished, results)]  # runnable as is
    assert any(f"Made on {day} " in text for day in days)
    s_per_step = {
        recipe: fmean(fmean(h["s_per_step"] for h in json.loads(
            (finished / f"seed_{s}" / recipe / "train_summary.json").read_text())["history"]) for s in (0, 1))
        for recipe in RECIPES}
    # tiny: VQA 0.9, 0.7: mean 0.8, sd sqrt((0.1² + 0.1²) / 1) = 0.1414; Acc@0.5 0.8, 0.6: 0.7 ± 0.1414
    assert f"| tiny | 0, 1 | 0.800 ± 0.141 | +0.0 | 0.700 ± 0.141 | {s_per_step['tiny']:.3f} | 16.0 |" in text
    # pool_adapter: VQA 0.5, 0.8: 0.65 ± sqrt(2 * 0.15²) = 0.2121, vs tiny (-0.4 + 0.1) / 2 = -15 points;
    # Acc@0.5 0.25, 0.75: 0.5 ± sqrt(2 * 0.25²) = 0.3536; 2x2 pooled tokens
    assert (f"| pool_adapter | 0, 1 | 0.650 ± 0.212 | -15.0 | 0.500 ± 0.354 | {s_per_step['pool_adapter']:.3f} "
            "| 4.0 |") in text
    assert text.count("| tiny | 0 | 2 | 0.900 | +0.0 | 0.800 |") == 1  # the per-run table precedes the means


def test_a_failing_table_leaves_the_old_results_file(finished: Path, tmp_path: Path, trained: list[Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    results = tmp_path / "ablation.md"
    results.write_text("the previous table\n")
    real, rows = ablation.row, []

    def row(run_dir: Path) -> dict[str, Any]:
        if len(rows) == 3:
            raise OSError(f"{run_dir}: unreadable")
        rows.append(run_dir)
        return real(run_dir)

    monkeypatch.setattr(ablation, "row", row)
    with pytest.raises(OSError, match="unreadable"):
        ablation.main(_argv(finished, results))
    assert len(rows) == 3 and results.read_text() == "the previous table\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ablation.md"]  # no temp file left beside it
