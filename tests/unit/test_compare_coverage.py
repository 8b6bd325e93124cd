"""`avgk compare` on runs with set rules: set sizes at each coverage target, paired by seed, per frequency bin."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipelines import cli


def _run(folder: Path, *, loss: str, seed: int, size: float, oracle: bool) -> str:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"loss": {"name": loss, "k": 2}, "train": {"seed": seed}}))
    entry = {"coverage": 0.95, "avg_set_size": size,
             "by_frequency": {"few": {"coverage": 0.8, "avg_set_size": 2 * size}, "medium": {"coverage": None},
                              "many": {"coverage": 0.97, "avg_set_size": size / 2}}}
    test = {"avg_k_accuracy": {"2": 0.5}, "macro_avg_k_accuracy": {"2": 0.4}, "top_k_accuracy": {"2": 0.6},
            "avg_set_size": {"2": 2.0}, "set_rules": {"coverage": {"0.95": entry}}}
    if oracle:
        test["oracle_set_rules"] = {"coverage": {"0.95": {**entry, "avg_set_size": 1.5, "coverage": 0.951}}}
    (folder / "metrics.json").write_text(json.dumps({"ks": [2], "test": test}))
    return f"{loss}={folder}"


def test_compare_tables_the_set_sizes_at_each_coverage_target(tmp_path, capsys):
    runs = [_run(tmp_path / f"{loss}{seed}", loss=loss, seed=seed, size=size, oracle=loss == "ce")
            for loss, seed, size in [("ce", 0, 4.0), ("ce", 1, 5.0), ("two_head", 0, 3.0), ("two_head", 1, 3.5)]]
    assert cli.main(["compare", *runs, "--reference", "ce", "--out", str(tmp_path / "cmp")]) == 0
    capsys.readouterr()
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    section = text[text.index("### coverage at coverage 0.95"):].splitlines()
    assert "| ce | 2 | 95.00 | 4.50 ± 0.71 | (reference) | | 80.00, 9.00 | - | 97.00, 2.25 |" in section
    # two_head - ce: -1.0 and -1.5 (mean -1.25); t(0.975, 1) = 12.706, std 0.354: half-width 3.18
    assert "| two_head | 2 | 95.00 | 3.25 ± 0.35 | -1.25 (2 pairs) | [-4.43, +1.93] | 80.00, 6.50 | - | 97.00, 1.62 |" in section
    assert any("Bayes-optimal sets" in line and "mean size 1.50 at coverage 95.10%" in line for line in section)
