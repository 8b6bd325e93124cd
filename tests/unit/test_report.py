"""Figures (titled, labelled, valid PNGs) and `avgk report` on small hand-made run directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from avgk.experiments import report
from pipelines import cli


def fake_metrics(shift: float, *, oracle: bool = True) -> dict:
    ks = ["1", "2", "3"]
    test = {
        "num_samples": 100,
        "avg_k_accuracy": {k: 0.4 + 0.1 * i + shift for i, k in enumerate(ks)},
        "macro_avg_k_accuracy": {k: 0.3 + 0.1 * i + shift for i, k in enumerate(ks)},
        "avg_set_size": {"1": 1.02, "2": 1.97, "3": 3.05},
        "top_k_accuracy": {k: 0.35 + 0.1 * i + shift for i, k in enumerate(ks)},
        "macro_top_k_accuracy": {k: 0.3 for k in ks},
        "empty_set_fraction": {k: 0.1 for k in ks},
        "set_size_histogram": {"1": {"0": 30, "1": 40, "2": 30}, "2": {"1": 50, "2": 10, "4": 40},
                               "3": {"2": 40, "3": 25, "4": 35}},
    }
    if oracle:
        test["oracle_avg_k_accuracy"] = {k: 0.9 for k in ks}
    test["set_rules"] = {rule: {target: {
        "target": float(target), "coverage": float(target) - 0.01 + shift, "macro_coverage": float(target) - 0.05,
        "avg_set_size": size * (1 - shift), "classes_below_target": 3, "num_classes": 20,
        "calibration": {"n": 100, "m": 91, "full_label_set": target == "0.99" and rule == "aps", "pooled_classes": 0},
        "head": head,
    } for target, size in (("0.9", 2.5), ("0.95", 4.0), ("0.99", 9.0))}
        for rule, head in (("coverage", "multilabel"), ("aps", "softmax"))}  # a two-head run's two heads
    return {"ks": [1.0, 2.0, 3.0], "score_head": "multilabel", "val": {"thresholds": {}}, "test": test}


def fake_per_class(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    counts = np.geomspace(2, 500, 20).astype(np.int64)
    table = {"class_id": np.arange(20), "num_samples": np.full(20, 5), "train_count": counts}
    for k in ("1", "2", "3"):
        table[f"avg_k_accuracy@{k}"] = np.clip(np.log10(counts) / 3 + rng.normal(0, 0.1, 20), 0, 1)
    table["avg_k_accuracy@1"][3] = np.nan  # a class absent from test
    return table


def write_run(run_dir: Path, shift: float, seed: int, *, oracle: bool = True) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(fake_metrics(shift, oracle=oracle)))
    pq.write_table(pa.table(fake_per_class(seed)), run_dir / "per_class.parquet")
    return run_dir


@pytest.fixture
def runs() -> dict[str, report.RunResults]:
    return {
        "two_head": report.RunResults(fake_metrics(0.05), fake_per_class(0)),
        "ce": report.RunResults(fake_metrics(0.0, oracle=False), fake_per_class(1)),
    }


def assert_labelled(fig) -> None:
    for ax in fig.axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), (ax.get_title(), ax.get_xlabel())


def assert_png(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size


@pytest.mark.parametrize(
    "make, title",
    [
        (lambda r: report.plot_accuracy_vs_k(r), "Test accuracy against K"),
        (lambda r: report.plot_per_class_accuracy(r, k="2"), "Per-class avg-2 accuracy against training frequency"),
        (lambda r: report.plot_set_size_histogram(r, k="2"), "Predicted set sizes at average-K = 2 (test)"),
        (lambda r: report.plot_coverage_vs_target(r), "Test coverage against the coverage target (calibrated on val)"),
        (lambda r: report.plot_size_vs_coverage(r), "Mean set size against test coverage"),
    ],
)
def test_figures_are_titled_labelled_pngs(runs, make, title, tmp_path):
    fig = make(runs)
    assert_labelled(fig)
    assert fig.axes[0].get_title() == title
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert any(label.startswith("two_head") for label in labels) and any(label.startswith("ce") for label in labels)
    report.save_figure(fig, tmp_path / "fig.png")
    assert_png(tmp_path / "fig.png", (1000, 450) if "coverage" in title else (700, 450))  # legends beside the axes


def test_size_against_coverage_names_each_lines_head(runs):
    """A two-head run's rules on its two heads, and its average-K, each named with the head it thresholds."""
    labels = report.plot_size_vs_coverage(runs).axes[0].get_legend_handles_labels()[1]
    assert {"two_head coverage (multilabel head)", "two_head aps (softmax head)",
            "two_head average-K (multilabel head)"} <= set(labels)


def test_per_class_plot_has_a_log_frequency_axis(runs):
    assert report.plot_per_class_accuracy(runs, k="1").axes[0].get_xscale() == "log"


def test_plot_sweep(tmp_path):
    df = pd.DataFrame({"train.lr": [0.001, 0.01, 0.1, 1.0], "loss.name": ["ce", "two_head", "ce", "two_head"],
                       "val_avg_k_accuracy": [0.3, 0.5, 0.6, 0.2]})
    fig = report.plot_sweep(df, ["train.lr", "loss.name"], "val_avg_k_accuracy", tmp_path / "sweep.png")
    assert_labelled(fig)
    assert fig.axes[0].get_xscale() == "log" and fig.axes[1].get_xscale() == "linear"
    assert_png(tmp_path / "sweep.png", (800, 360))
    with pytest.raises(ValueError, match=r"columns \['nope'\] are not in the frame"):
        report.plot_sweep(df, ["nope"], "val_avg_k_accuracy")


def test_write_run_plots(tmp_path):
    run_dir = write_run(tmp_path / "run", 0.0, 0)
    written = report.write_run_plots(str(run_dir))
    names = sorted(Path(w).name for w in written)
    assert names == sorted(["accuracy_vs_k.png", *(f"per_class_avg_k{k}.png" for k in "123"),
                            *(f"set_size_k{k}.png" for k in "123"), "coverage_vs_target.png", "size_vs_coverage.png"])
    for name in names:
        assert_png(run_dir / "plots" / name, (1000, 450) if "coverage" in name else (700, 450))


def test_cli_report_writes_a_row_per_run(tmp_path, capsys):
    first = write_run(tmp_path / "a" / "two_head", 0.05, 0)
    second = write_run(tmp_path / "b" / "ce", 0.0, 1, oracle=False)
    out = tmp_path / "out"
    assert cli.main(["report", str(first), str(second), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    text = (out / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 2 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["two_head", "ce"]
    assert rows[0].split("|")[3].strip() == "55.00" and rows[0].split("|")[-2].strip() == "90.00"
    assert rows[1].split("|")[-2].strip() == "-"  # no oracle
    assert "| K | run |" in printed
    assert (out / "accuracy_vs_k.png").is_file() and (out / "per_class_avg_k2.png").is_file()
    assert (out / "coverage_vs_target.png").is_file() and (out / "size_vs_coverage.png").is_file()
    coverage = text[text.index("## Set rules with a coverage target"):].splitlines()
    assert "| two_head | coverage (multilabel head) | 0.95 | 99.00 | 90.00 | 3 of 20 | 3.80 |" in coverage
    assert "| ce | aps (softmax head) | 0.99 (full label set) | 98.00 | 94.00 | 3 of 20 | 9.00 |" in coverage


def test_cli_report_missing_run_is_one_error_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("avgk: error: no metrics.json in run directory")


@pytest.mark.parametrize(
    "shift, expected",
    [
        (0.05, "two_head wins at avg-2: 55.0% against 50.0% for ce (5.0 points)"),
        (-0.10, "ce wins at avg-2: 50.0% against 40.0% for two_head (10.0 points)"),
        (0.002, "two_head and ce tie at avg-2 (50.2% and 50.0%)"),
    ],
)
def test_the_demo_verdict_says_who_wins_by_how_much_and_where_the_study_is(shift, expected):
    from avgk.experiments.summary import verdict

    documents = {"two_head": fake_metrics(shift), "ce": fake_metrics(0.0)}
    sentence = verdict(documents, method="two_head", reference="ce", k=2)
    assert expected in sentence
    # The macro figures name their methods: the lead may name the winner first, whichever it is.
    macro = {name: 100 * doc["test"]["macro_avg_k_accuracy"]["2"] for name, doc in documents.items()}
    assert (f"macro avg-2: {macro['two_head']:.1f}% for two_head, {macro['ce']:.1f}% for ce "
            f"({100 * shift:+.1f} points for two_head)") in sentence
    assert sentence.endswith("are in docs/RESULTS.md.")
