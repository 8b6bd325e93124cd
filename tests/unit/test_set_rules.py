"""The set rules in the evaluation: calibration gathered across streams and ranks, set sizes and coverage counts,
all against plain NumPy references on random scores (ties included), and the config's one-line errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avgk.config import ConfigError, load_config
from avgk.config.evaluation import SetRuleConfig
from avgk.evaluation import passes, set_rules
from avgk.evaluation.coverage_passes import CalibrationPass, CoverageMetricsPass

L = 12
RULES = [SetRuleConfig(rule="coverage", coverages=[0.5, 0.9, 0.999]), SetRuleConfig(rule="aps", coverages=[0.8]),
         SetRuleConfig(rule="raps", coverages=[0.9], penalty=0.05, k_reg=2),
         SetRuleConfig(rule="class_coverage", coverages=[0.9], min_count=40)]


def _split(rng: np.random.Generator, n: int, *, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    logits = rng.normal(size=(n, L)) * 2 + np.linspace(0, 3, L)  # long tail: the last classes score high
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if ties:
        probs = np.round(probs * 8) / 8 + 1e-3
        probs /= probs.sum(axis=1, keepdims=True)
    probs = probs.astype(np.float32)
    labels = np.array([rng.choice(L, p=row / row.sum()) for row in probs.astype(np.float64)])
    return probs, labels


def _streams(probs: np.ndarray, labels: np.ndarray, *, ranks: int, chunk: int) -> list[list[passes.Batch]]:
    """Rank r's batches: every ranks-th sample (a DDP sampler's split), in chunks, shuffled within the rank."""
    out = []
    for rank in range(ranks):
        idx = np.arange(rank, labels.size, ranks)[::-1]
        out.append([{"scores": probs[idx[i:i + chunk]], "label": labels[idx[i:i + chunk]], "idx": idx[i:i + chunk]}
                    for i in range(0, idx.size, chunk)])
    return out


def _run_over_ranks(data: dict[str, list[list[passes.Batch]]]) -> passes.RunPasses:
    """Each pass on every rank, the states summed: what all_reduce_sum does across DDP ranks."""
    def run(spec, split):
        totals: list = []
        while not spec.done(totals):
            states = [spec.run(totals, iter(batches)) for batches in data[split]]
            if isinstance(states[0], dict):
                totals.append({key: np.sum([s[key] for s in states], axis=0) for key in states[0]})
            else:
                totals.append(np.sum(states, axis=0))
        return totals
    return run


def _reference_sets(rule: set_rules.CalibratedRule, probs: np.ndarray) -> np.ndarray:
    """Membership by the rule's definition, one row and one label at a time."""
    members = np.zeros(probs.shape, dtype=bool)
    for i, row in enumerate(probs):
        if rule.rule == "coverage":
            members[i] = row >= np.float32(rule.threshold)
        elif rule.rule == "class_coverage":
            members[i] = [row[c] >= np.float32(rule.thresholds_L[c]) for c in range(L)]
        else:
            order = sorted(range(L), key=lambda c: (-row[c], c))
            mass = 0.0
            for rank, label in enumerate(order, start=1):
                mass += float(row[label])
                members[i, label] = mass + rule.penalty * max(rank - rule.k_reg, 0) <= rule.q
    return members


@pytest.mark.parametrize("ties", [False, True])
def test_calibration_and_counts_over_ranks_equal_the_numpy_reference(ties):
    rng = np.random.default_rng(7)
    val, test = _split(rng, 600, ties=ties), _split(rng, 500, ties=ties)
    train_counts = np.arange(L) * 15
    data = {"val": _streams(*val, ranks=3, chunk=37), "test": _streams(*test, ranks=2, chunk=64)}
    evaluation = passes.evaluate(
        _run_over_ranks(data), ks=[1, 2], num_classes=L, train_class_counts=train_counts, freq_bins=(40, 100),
        score_head="softmax", with_posterior=False, set_rules=RULES, num_val_samples=600)

    # calibration: the same as on the whole val matrix in one process
    mass, rank = set_rules.cs.true_mass_and_rank(probs_NL=val[0], labels_N=val[1])
    expected = set_rules.calibrate(RULES, true_N=val[0][np.arange(600), val[1]], labels_N=val[1], num_classes=L,
                                   mass_N=mass, rank_N=rank, head="softmax")
    assert evaluation.set_rules == expected
    assert [r.key for r in expected] == ["coverage@0.5", "coverage@0.9", "coverage@0.999", "aps@0.8", "raps@0.9",
                                         "class_coverage@0.9"]
    assert expected[2].full_label_set and expected[2].threshold == -math.inf  # m = 601 > n = 600
    assert expected[5].pooled == tuple(int(c) for c in np.flatnonzero(np.bincount(val[1], minlength=L) < 40))

    probs, labels = test
    for rule in expected:
        members = _reference_sets(rule, probs)
        np.testing.assert_array_equal(rule.members(probs), members)
        sizes, covered = members.sum(axis=1), members[np.arange(labels.size), labels]
        doc = evaluation.metrics["test"]["set_rules"][rule.name][set_rules.format_k(rule.coverage)]
        assert doc["coverage"] == covered.mean()
        assert doc["avg_set_size"] == sizes.mean()
        assert doc["set_size_histogram"] == {str(s): int(c) for s, c in zip(*np.unique(sizes, return_counts=True), strict=True)}
        assert doc["coverage_by_set_size"] == {str(s): covered[sizes == s].mean() for s in np.unique(sizes)}
        per_class = np.array([covered[labels == c].mean() for c in range(L)])
        np.testing.assert_array_equal(evaluation.per_class[f"coverage@{rule.key}"], per_class)
        assert doc["macro_coverage"] == pytest.approx(per_class.mean(), abs=1e-15)
        assert doc["classes_below_target"] == int((per_class < rule.coverage).sum())
        few = np.isin(labels, np.flatnonzero(train_counts < 40))
        assert doc["by_frequency"]["few"]["coverage"] == covered[few].mean()
        assert doc["by_frequency"]["few"]["avg_set_size"] == sizes[few].mean()
    full = evaluation.metrics["test"]["set_rules"]["coverage"]["0.999"]
    assert full["coverage"] == 1.0 and full["full_set_fraction"] == 1.0 and full["calibration"]["full_label_set"]


def test_scorer_columns_give_the_counts_of_full_rows():
    """A scorer that keeps only each row's set sizes and coverage gives the counts full rows give."""
    rng = np.random.default_rng(3)
    probs, labels = _split(rng, 300, ties=True)
    rules = set_rules.calibrate(RULES[:2], true_N=probs[np.arange(300), labels], labels_N=labels, num_classes=L,
                                mass_N=set_rules.cs.true_mass_and_rank(probs_NL=probs, labels_N=labels)[0],
                                rank_N=set_rules.cs.true_mass_and_rank(probs_NL=probs, labels_N=labels)[1])
    spec = CoverageMetricsPass(rules=tuple(rules), num_classes=L, train_class_counts=None, freq_bins=(20, 100))
    full = spec.run([], iter([{"scores": probs, "label": labels}]))
    columns = set_rules.rule_columns(probs, labels_N=labels, rules=rules)
    kept = spec.run([], iter([{"label": labels, **columns}]))
    assert full.keys() == kept.keys() and all(np.array_equal(full[k], kept[k]) for k in full)
    with pytest.raises(ValueError, match=r"test rows hold neither full scores nor the set sizes of \['coverage@0.5'"):
        spec.run([], iter([{"label": labels, "scores_top": probs[:, :3]}]))


def test_a_sample_read_twice_or_out_of_range_is_an_error():
    probs, labels = _split(np.random.default_rng(0), 10, ties=False)
    spec = CalibrationPass(rules=(RULES[0],), num_samples=10, num_classes=L)
    batch = {"scores": probs, "label": labels, "idx": np.arange(10)}
    with pytest.raises(ValueError, match=r"sample index 0 was read 2 times: calibration needs each val sample once"):
        spec.calibrate([spec.run([], iter([batch, batch]))])
    with pytest.raises(ValueError, match=r"sample indices must lie in \[0, 10\) for the split's 10 samples, got 5..14"):
        spec.run([], iter([{**batch, "idx": np.arange(5, 15)}]))


def test_calibrated_rules_survive_thresholds_json():
    probs, labels = _split(np.random.default_rng(1), 200, ties=False)
    mass, rank = set_rules.cs.true_mass_and_rank(probs_NL=probs, labels_N=labels)
    rules = set_rules.calibrate(RULES, true_N=probs[np.arange(200), labels], labels_N=labels, num_classes=L,
                                mass_N=mass, rank_N=rank, head="softmax")
    import json

    document = json.loads(json.dumps(set_rules.rules_to_json(rules), allow_nan=False))
    assert set_rules.rules_from_json(document) == rules
    for targets in document.values():  # thresholds.json written before rules had a head: the score head's
        for entry in targets.values():
            del entry["head"]
    assert [rule.head for rule in set_rules.rules_from_json(document)] == [None] * len(rules)


@pytest.mark.parametrize(
    "override, match",
    [
        ("eval.set_rules=[{rule: lac}]", r"eval.set_rules.0.rule='lac': Input should be 'coverage', 'aps', 'raps' or "
                                         r"'class_coverage'"),
        ("eval.set_rules=[{rule: coverage, coverages: [1.0]}]", r"every coverage target must lie strictly between 0 "
                                                                r"and 1, got 1.0"),
        ("eval.set_rules=[{rule: aps}, {rule: aps, coverages: [0.5]}]", r"eval.set_rules names must be unique, got "
                                                                        r"\['aps'\] more than once"),
        ("eval.set_rules=[{rule: raps, name: 'my rule'}]", r"eval.set_rules.0.name='my rule'"),
        ("eval.set_rules=[{rule: class_coverage, min_count: 0}]", r"eval.set_rules.0.min_count=0"),
    ],
)
def test_set_rule_config_errors_name_the_value_and_the_rule(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_two_rules_of_one_kind_with_their_own_names():
    config = load_config(None, ["eval.set_rules=[{rule: raps, name: raps-light, penalty: 0.001}, {rule: raps}]"])
    assert [rule.key for rule in config.eval.set_rules] == ["raps-light", "raps"]


def test_aps_on_scores_that_are_not_probabilities_gets_a_note():
    rules = [SetRuleConfig(rule="coverage"), SetRuleConfig(rule="raps", name="raps-a")]
    assert set_rules.head_note(rules, score_head="softmax") == ""
    assert set_rules.head_note(rules[:1], score_head="multilabel") == ""
    note = set_rules.head_note(rules, score_head="multilabel")
    assert note.startswith("note: eval.set_rules raps-a build sets from cumulative probability mass, but the "
                           "multilabel head's scores do not sum to 1")


def test_rules_on_another_head_read_that_heads_rows():
    """A two-head run: rules on the score head read "scores", a rule with head=softmax reads the softmax rows,
    each calibrated and counted as on its own head's matrix; the sets and counts say which head they took."""
    rng = np.random.default_rng(11)
    val, test = _split(rng, 400, ties=False), _split(rng, 300, ties=False)
    sigmoid = {name: (1 / (1 + np.exp(-rng.normal(size=split[0].shape) * 3))).astype(np.float32)
               for name, split in (("val", val), ("test", test))}
    rules = [SetRuleConfig(rule="coverage", coverages=[0.9]),
             SetRuleConfig(rule="aps", name="aps_softmax", head="softmax", coverages=[0.9]),
             SetRuleConfig(rule="raps", head="multilabel", coverages=[0.8])]  # the score head named: "scores"
    groups = set_rules.by_column(rules, score_head="multilabel")
    assert {column: [r.key for r in group] for column, group in groups.items()} == {
        "scores": ["coverage", "raps"], "softmax": ["aps_softmax"]}

    def streams(split, probs, labels):
        batches = _streams(sigmoid[split], labels, ranks=2, chunk=50)
        for rank in batches:  # the same samples' softmax rows beside their sigmoids
            for batch in rank:
                batch["softmax"] = probs[batch["idx"]]
        return batches

    data = {"val": streams("val", *val), "test": streams("test", *test)}
    evaluation = passes.evaluate(
        _run_over_ranks(data), ks=[1], num_classes=L, train_class_counts=np.full(L, 50), freq_bins=(40, 100),
        score_head="multilabel", with_posterior=False, set_rules=rules, num_val_samples=400)

    def reference(scores, labels, group, head):
        mass, rank = set_rules.cs.true_mass_and_rank(probs_NL=scores, labels_N=labels)
        return set_rules.calibrate(group, true_N=scores[np.arange(labels.size), labels], labels_N=labels,
                                   num_classes=L, mass_N=mass, rank_N=rank, head=head)

    expected = (reference(sigmoid["val"], val[1], groups["scores"], "multilabel")
                + reference(val[0], val[1], groups["softmax"], "softmax"))
    assert evaluation.set_rules == expected
    assert [(r.key, r.head) for r in expected] == [("coverage@0.9", "multilabel"), ("raps@0.8", "multilabel"),
                                                   ("aps_softmax@0.9", "softmax")]
    for rule in expected:
        scores = test[0] if rule.head == "softmax" else sigmoid["test"]
        members = _reference_sets(rule, scores)
        doc = evaluation.metrics["test"]["set_rules"][rule.name][set_rules.format_k(rule.coverage)]
        assert doc["head"] == rule.head
        assert doc["coverage"] == members[np.arange(300), test[1]].mean()
        assert doc["avg_set_size"] == members.sum(axis=1).mean()
    assert evaluation.metrics["val"]["set_rules"]["aps_softmax"]["0.9"]["head"] == "softmax"
    assert set_rules.head_note(rules, score_head="multilabel").startswith("note: eval.set_rules raps build sets")


def test_a_rule_on_a_head_the_model_lacks_is_refused_in_one_line():
    rules = [SetRuleConfig(rule="aps", head="multilabel")]
    with pytest.raises(ValueError, match=r"^eval.set_rules 'aps' has head='multilabel', but loss 'ce' trains only "
                                         r"\['softmax'\]$"):
        set_rules.check_heads(rules, heads=("softmax",), loss="ce")
    set_rules.check_heads([SetRuleConfig(rule="aps", head="fused")], heads=("softmax", "multilabel"), loss="two_head")
    with pytest.raises(ConfigError, match=r"eval.set_rules.0.head='sigmoid'"):
        load_config(None, ["eval.set_rules=[{rule: aps, head: sigmoid}]"])


def test_a_scorer_adds_each_columns_calibration_with_the_mass_only_its_rules_need():
    """SetColumns per column: the true label's score for a coverage rule, its mass and rank too for aps; the
    same numbers calibration_columns gives, and a column nobody calibrates gets none."""
    from pipelines.scoring import SetColumns

    probs, labels = _split(np.random.default_rng(5), 40, ties=False)
    columns = SetColumns.calibrating({"scores": [RULES[0]], "softmax": [RULES[1]]})
    assert columns.heads == ("softmax",)
    scores = columns.of(probs, labels_N=labels)
    assert sorted(scores) == ["cal_true"]
    softmax = columns.of(probs, labels_N=labels, column="softmax")
    expected = set_rules.calibration_columns(probs, labels_N=labels, with_mass=True, column="softmax")
    assert sorted(softmax) == ["softmax_cal_mass", "softmax_cal_rank", "softmax_cal_true"]
    assert all(np.array_equal(softmax[k], expected[k]) for k in expected)
    assert columns.of(probs, labels_N=labels, column="posterior") == {}
