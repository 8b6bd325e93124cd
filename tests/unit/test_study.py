"""The study config (cells, validation, overrides) and the pure aggregation (rows, paired gains, frequency bins)."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest

from avgk.experiments.study import cell_row, frequency_gains, paired_gains, summarize
from avgk.experiments.study_config import StudyConfigError, load_study
from tests.helpers.runs import ROOT

STUDY = ROOT / "configs" / "studies" / "synthetic.yaml"


def write_study(tmp_path, text: str):
    path = tmp_path / "study.yaml"
    path.write_text(f"name: s\nbase: {ROOT / 'configs' / 'smoke.yaml'}\n" + text)
    return path


def test_committed_study_has_every_cell_validated():
    _study, _base, cells = load_study(STUDY)
    assert len(cells) == 8 * 4 * 3
    assert len({c.name for c in cells}) == len(cells)
    assert {c.config.loss.name for c in cells} == {"ce", "two_head", "an", "wan", "epr", "role", "em", "em_apl"}
    by_rate = {}
    for c in cells:  # one data set per ambiguity rate, shared by every method and seed
        by_rate.setdefault(c.ambiguity, set()).add(c.config.data.shards)
        assert c.config.data.synthetic.ambiguity_rate == c.ambiguity and c.config.train.seed == c.seed
        assert c.config.run.storage.endswith("synthetic-study/runs") and c.config.run.name == c.name
    assert all(len(v) == 1 for v in by_rate.values()) and len({next(iter(v)) for v in by_rate.values()}) == 4


def test_command_line_keys_win_over_the_study_file():
    study, base, cells = load_study(STUDY, ["train.epochs=1", "seeds=[5]", "max_concurrent=1"])
    assert base.train.epochs == 1 and all(c.config.train.epochs == 1 for c in cells)
    assert study.seeds == [5] and study.max_concurrent == 1 and len(cells) == 8 * 4


@pytest.mark.parametrize(
    "text, message",
    [
        ("methods: {a: {loss.nme: ce}}\nambiguity_rates: [0]\nseeds: [0]\nreference: a\n", "unknown config key 'loss.nme'"),
        ("methods: {a: {loss.name: ce}}\nambiguity_rates: [0]\nseeds: [0]\nreference: b\n", "reference='b' is not one of"),
        ("methods: {a: {run.name: x}}\nambiguity_rates: [0]\nseeds: [0]\nreference: a\n", "the study sets these keys"),
        ("methods: {a: {loss.name: ce}}\nambiguity_rates: [1.5]\nseeds: [0]\nreference: a\n", "must lie in [0, 1], got [1.5]"),
        ("methods: {a: {loss.name: nope}}\nambiguity_rates: [0]\nseeds: [0]\nreference: a\n", "methods['a']"),
        ("methods: {a: {loss.k: 50}}\nambiguity_rates: [0]\nseeds: [0]\nreference: a\n", "loss.k must be <"),
        ("methods: {a: {}}\nambiguity_rates: [0]\nseeds: [0, 0]\nreference: a\n", "seeds must be distinct"),
    ],
)
def test_bad_study_is_one_clear_error(tmp_path, text, message):
    with pytest.raises(StudyConfigError) as err:
        load_study(write_study(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


def metrics_doc(avg2: float, macro2: float, oracle2: float) -> dict:
    return {"score_head": "multilabel", "test": {
        "avg_k_accuracy": {"1": avg2 / 2, "2": avg2}, "macro_avg_k_accuracy": {"2": macro2},
        "avg_set_size": {"2": 2.0}, "oracle_avg_k_accuracy": {"2": oracle2}, "gap_to_oracle": {"2": oracle2 - avg2},
        "by_frequency": {"few": {"avg_k_accuracy": {"2": 0.1}}, "many": {"avg_k_accuracy": {"2": 0.9}}},
    }}


def test_cell_row_flattens_per_k_metrics_and_history():
    history = [{"val_avg_k_accuracy": v} for v in (0.2, 0.5, 0.4)]
    row = cell_row(method="ce", ambiguity=0.25, seed=1, metrics=metrics_doc(0.8, 0.7, 0.9), history=history, seconds=3.0)
    assert row["avg_k_accuracy@2"] == 0.8 and row["avg_k_accuracy@1"] == 0.4 and row["macro_avg_k_accuracy@2"] == 0.7
    assert row["gap_to_oracle@2"] == pytest.approx(0.1) and row["few_avg_k_accuracy@2"] == 0.1
    assert row["best_epoch"] == 2 and row["epochs"] == 3 and row["val_avg_k_accuracy_last"] == 0.4
    assert row["seconds"] == 3.0 and row["ambiguity"] == 0.25


def rows_frame() -> pd.DataFrame:
    values = {("ce", 0): 0.60, ("ce", 1): 0.64, ("th", 0): 0.65, ("th", 1): 0.66, ("th", 2): 0.9}
    return pd.DataFrame([{"method": m, "ambiguity": 0.5, "seed": s, "avg_k_accuracy@2": v} for (m, s), v in values.items()])


def test_paired_gains_pair_by_seed_and_skip_unpaired():
    gains = paired_gains(rows_frame(), reference="ce", column="avg_k_accuracy@2").set_index("method")
    # th - ce per seed: 0.05 and 0.02 (seed 2 has no ce run): mean 0.035, std sqrt(((0.015)^2 * 2) / 1)
    assert gains.loc["th", "pairs"] == 2
    assert gains.loc["th", "gain:mean"] == pytest.approx(0.035)
    assert gains.loc["th", "gain:std"] == pytest.approx(math.sqrt(2 * 0.015**2))
    assert gains.loc["ce", "gain:mean"] == 0.0
    with pytest.raises(KeyError, match="reference method 'x'"):
        paired_gains(rows_frame(), reference="x", column="avg_k_accuracy@2")


def test_summarize_mean_std_and_seed_count():
    summary = summarize(rows_frame(), columns=["avg_k_accuracy@2"]).set_index("method")
    assert summary.loc["ce", "avg_k_accuracy@2:mean"] == pytest.approx(0.62)
    assert summary.loc["ce", "avg_k_accuracy@2:std"] == pytest.approx(math.sqrt(2 * 0.02**2))
    assert summary.loc["th", "seeds"] == 3
    with pytest.raises(KeyError, match="nope"):
        summarize(rows_frame(), columns=["nope"])


def test_frequency_gains_bin_classes_by_training_count():
    rows = []
    counts = {0: 100, 1: 50, 2: 10, 3: 5}
    for seed in (0, 1):
        for cls, count in counts.items():
            rows.append({"method": "ce", "ambiguity": 0.0, "seed": seed, "class_id": cls, "train_count": count,
                         "num_samples": 4, "avg_k_accuracy@2": 0.5})
            # the method gains 0.1 on frequent classes, 0.3 on rare ones; seed 1 adds 0.1 more
            gain = (0.1 if count >= 50 else 0.3) + 0.1 * seed
            rows.append({"method": "th", "ambiguity": 0.0, "seed": seed, "class_id": cls, "train_count": count,
                         "num_samples": 4, "avg_k_accuracy@2": 0.5 + gain})
    rows.append({"method": "th", "ambiguity": 0.0, "seed": 0, "class_id": 9, "train_count": 1,
                 "num_samples": 0, "avg_k_accuracy@2": 0.0})  # no test sample: left out
    freq = frequency_gains(pd.DataFrame(rows), reference="ce", method="th", k=2, num_bins=2)
    assert freq["classes"].sum() == 4
    rare, frequent = freq.iloc[0], freq.iloc[-1]
    assert rare["train_count_max"] < frequent["train_count_min"]
    assert rare["gain:mean"] == pytest.approx(0.35) and frequent["gain:mean"] == pytest.approx(0.15)


def fake_study_frames(rates=(0.0, 0.5), seeds=(0, 1)):
    rows, tables = [], []
    for a in rates:
        for method, bonus in (("ce", 0.0), ("two_head", 0.03)):
            for seed in seeds:
                avg = 0.7 - 0.2 * a + bonus + 0.01 * seed
                rows.append(cell_row(method=method, ambiguity=a, seed=seed, metrics=metrics_doc(avg, avg - 0.05, 0.95),
                                     history=[{"val_avg_k_accuracy": avg}], seconds=10.0))
                tables.append(pd.DataFrame({"method": method, "ambiguity": a, "seed": seed, "class_id": range(6),
                                            "num_samples": 5, "train_count": [1, 2, 5, 10, 50, 100],
                                            "avg_k_accuracy@2": avg}))
    return pd.DataFrame(rows), pd.concat(tables, ignore_index=True)


def test_write_summary_tables_and_figures(tmp_path):
    from avgk.experiments.study_summary import write_summary

    study, base, _ = load_study(STUDY, ["focus=[two_head]", "eval.ks=[2]"])
    rows, per_class = fake_study_frames()
    text = write_summary(study, base, tmp_path, rows, per_class, failed=["x-a0-s9"])
    assert "**failed: x-a0-s9**" in text and "## K = 2" in text
    assert "| two_head | +3.0 ± 0.0 | +3.0 ± 0.0 |" in text  # paired gain, both rates, in points
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "per_class.parquet").is_file()
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "gain_vs_ambiguity_avg_k_accuracy_k2.png", "gain_vs_ambiguity_avg_k_accuracy_k2_focus.png",
        "gain_vs_ambiguity_macro_avg_k_accuracy_k2.png", "gain_vs_ambiguity_macro_avg_k_accuracy_k2_focus.png",
        "gain_vs_frequency_two_head_k2.png",
    ]
    one_rate = tmp_path / "one"
    one_rate.mkdir()
    rows, per_class = fake_study_frames(rates=(0.5,))
    write_summary(study, base, one_rate, rows, per_class, failed=[])
    assert sorted(p.name for p in (one_rate / "plots").glob("gain_by_method*.png")) == [
        "gain_by_method_avg_k_accuracy_k2.png", "gain_by_method_macro_avg_k_accuracy_k2.png"]


def test_headline_k_must_be_evaluated():
    with pytest.raises(StudyConfigError, match=r"headline_k=4 must be one of eval.ks \[1.0, 2.0, 3.0, 5.0\]"):
        load_study(STUDY, ["headline_k=4"])


def test_study_needs_local_storage():
    with pytest.raises(StudyConfigError, match=re.escape("run.storage='s3://b/runs'")):
        load_study(STUDY, ["run.storage=s3://b/runs"])


def test_focus_must_name_methods(tmp_path):
    with pytest.raises(StudyConfigError, match=r"focus names \['b'\]"):
        load_study(write_study(tmp_path, "methods: {a: {}}\nambiguity_rates: [0]\nseeds: [0]\nreference: a\nfocus: [b]\n"))
