"""SetPredictor and `avgk predict` on a quick smoke training: sets match the evaluation, top-K, errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avgk.config import load_config
from avgk.inference.predict import SetPredictor, decode_image
from avgk.training import checkpoints
from pipelines import cli
from tests.helpers.runs import read_split


@pytest.fixture(scope="module")
def shards(predict_smoke_run) -> Path:
    return predict_smoke_run[0]


@pytest.fixture(scope="module")
def trained_run(predict_smoke_run) -> Path:
    return predict_smoke_run[1]


@pytest.fixture(scope="module")
def predictor(trained_run) -> SetPredictor:
    return SetPredictor.from_run(str(trained_run), "best", batch_size=64)


@pytest.fixture(scope="module")
def test_split(shards):
    return read_split(shards, "test")


def test_average_k_sets_reproduce_the_evaluation(predictor, trained_run, test_split):
    images, labels_N = test_split
    assert len(images) == 2000
    metrics = json.loads((trained_run / "metrics.json").read_text())["test"]
    assert predictor.ks == ["1", "2", "3"]
    for key in predictor.ks:
        sets = predictor.predict(images, k=float(key))
        mean_size = np.mean([s.size for s in sets])
        assert mean_size == pytest.approx(metrics["avg_set_size"][key], abs=1e-9), key
        # Thresholds come from val: on test the realised size is close to K, not equal. This
        # 2-epoch model's sets are bimodal (sizes 0 and 2 at K=1), so 2000 test images still
        # stray ~6% from K (measured 1.06 at K=1); 10% keeps the check meaningful and stable.
        assert mean_size == pytest.approx(float(key), rel=0.10), key
        accuracy = np.mean([label in s.ids for s, label in zip(sets, labels_N, strict=True)])
        assert accuracy == pytest.approx(metrics["avg_k_accuracy"][key], abs=1e-9), key
        for s in sets:
            assert s.scores == sorted(s.scores, reverse=True)
            assert all(score >= predictor.threshold(float(key)) - 1e-6 for score in s.scores)


def test_coverage_sets_reproduce_the_evaluation(predictor, trained_run, test_split):
    images, labels_N = test_split
    metrics = json.loads((trained_run / "metrics.json").read_text())["test"]["set_rules"]["coverage"]
    scores = predictor.score(images)
    assert sorted(metrics) == ["0.9", "0.95", "0.99"]
    for key, expected in metrics.items():
        sets = predictor.sets_of(scores, rule="coverage", coverage=float(key))
        assert np.mean([s.size for s in sets]) == pytest.approx(expected["avg_set_size"], abs=1e-12), key
        covered = np.mean([label in s.ids for s, label in zip(sets, labels_N, strict=True)])
        assert covered == pytest.approx(expected["coverage"], abs=1e-12), key
        assert all(s.scores == sorted(s.scores, reverse=True) for s in sets)


def test_a_rule_on_the_softmax_head_scores_that_head_and_reproduces_the_evaluation(predictor, trained_run, test_split):
    """The two-head model's aps rule on its softmax head: predict scores the softmax head for it (the score head,
    multilabel, for K and the coverage rule), and its sets are the evaluation's."""
    images, labels_N = test_split
    expected = json.loads((trained_run / "metrics.json").read_text())["test"]["set_rules"]["aps_softmax"]["0.9"]
    assert expected["head"] == "softmax" and predictor.heads == ("multilabel", "softmax")
    assert predictor.head_of(rule="aps_softmax", coverage=0.9) == "softmax"
    assert predictor.head_of(rule="coverage", coverage=0.9) == predictor.head_of(k=2) == "multilabel"
    sets = predictor.predict(images, rule="aps_softmax", coverage=0.9)
    assert np.mean([s.size for s in sets]) == pytest.approx(expected["avg_set_size"], abs=1e-12)
    covered = np.mean([label in s.ids for s, label in zip(sets, labels_N, strict=True)])
    assert covered == pytest.approx(expected["coverage"], abs=1e-12)
    softmax = predictor.score(images[:50], head="softmax")
    np.testing.assert_allclose(softmax.sum(axis=1), 1, atol=1e-5)  # probabilities, as aps assumes
    assert [s.ids for s in sets[:50]] == [s.ids for s in predictor.sets_of(softmax, rule="aps_softmax", coverage=0.9)]


def test_a_model_calibrated_on_fused_scores_predicts_with_them(predictor, trained_run, test_split):
    """loss.score_head=fused: thresholds on the geometric mean of the two heads' scores are served from those."""
    document = json.loads((trained_run / "thresholds.json").read_text())
    fused = SetPredictor(checkpoint=checkpoints.load_checkpoint_file_uri(str(trained_run / "best" / "checkpoint.pt")),
                         thresholds={**document, "score_head": "fused"})
    images = test_split[0][:20]
    scores = predictor.score_heads(images, heads=("softmax", "multilabel"))
    np.testing.assert_allclose(fused.score(images), np.sqrt(scores["softmax"] * scores["multilabel"]), rtol=1e-5)
    assert fused.head_of(k=2) == "fused" and fused.predict(images, k=2)


@pytest.mark.parametrize(
    "choice, match",
    [
        ({"rule": "aps", "coverage": 0.9}, r"no set rule 'aps' calibrated at coverage 0.9: calibrated are coverage at "
                                           r"0.9, coverage at 0.95, coverage at 0.99, aps_softmax at 0.9"),
        ({"rule": "coverage", "coverage": 0.8}, r"no set rule 'coverage' calibrated at coverage 0.8"),
        ({"rule": "coverage"}, r"a set rule needs both a rule name and a coverage target"),
        ({"rule": "coverage", "coverage": 0.9, "k": 2}, r"choose K \(k, top_k\) or a set rule \(rule, coverage\), not both"),
        ({}, r"choose a calibrated K, or a set rule and its coverage target"),
    ],
)
def test_an_uncalibrated_set_rule_is_refused_naming_those_calibrated(predictor, test_split, choice, match):
    with pytest.raises(ValueError, match=match):
        predictor.predict(test_split[0][:2], **choice)


def test_average_k_sets_average_exactly_k_on_the_calibration_split(predictor, shards):
    images, _ = read_split(shards, "val")
    for key in predictor.ks:
        mean_size = np.mean([s.size for s in predictor.predict(images, k=float(key))])
        # lambda_K is the midpoint between the m-th and (m+1)-th largest val scores, m = round(N K).
        assert abs(mean_size - float(key)) <= 0.5 / len(images), key


def test_top_k_returns_exactly_k_labels_best_first(predictor, test_split):
    images, _labels_N = test_split
    for k in (1, 2, 5):
        sets = predictor.predict(images[:50], k=k, top_k=True)
        assert all(s.size == k and s.scores == sorted(s.scores, reverse=True) for s in sets)
    scores_NL = predictor.score(images[:50])
    assert [s.ids[0] for s in predictor.predict(images[:50], k=1, top_k=True)] == list(scores_NL.argmax(1))


def test_inputs_names_and_batching_agree(predictor, trained_run, test_split, tmp_path):
    images, _ = test_split
    path = tmp_path / "a.png"
    path.write_bytes(images[0])
    as_bytes = predictor.predict(images[:3], k=2)
    mixed = predictor.predict([path, decode_image(images[1]), str(tmp_path / "a.png")], k=2)
    assert mixed[0] == as_bytes[0] and mixed[1] == as_bytes[1] and mixed[2] == as_bytes[0]
    assert as_bytes[0].names == [f"class_{i:02d}" for i in as_bytes[0].ids]  # from the shard manifest
    small = SetPredictor(
        checkpoint=checkpoints.load_checkpoint_file(trained_run / "best" / "checkpoint.pt"),
        thresholds={"score_head": predictor.score_head, "thresholds": predictor.thresholds},
        batch_size=7,
    )
    assert [s.ids for s in small.predict(images[:20], k=2)] == [s.ids for s in predictor.predict(images[:20], k=2)]
    assert small.class_names[:2] == ["0", "1"]  # no names given: the ids


@pytest.mark.parametrize(
    "k, top_k, match",
    [
        (1.5, False, r"k=1.5 was not calibrated for this run; calibrated K: 1, 2, 3"),
        (4, False, r"k=4 was not calibrated"),
        (1.5, True, r"top-K needs an integer k in \[1, 20\], got 1.5"),
        (21, True, r"top-K needs an integer k in \[1, 20\], got 21"),
    ],
)
def test_bad_k_is_an_error_naming_the_rule(predictor, test_split, k, top_k, match):
    with pytest.raises(ValueError, match=match):
        predictor.predict(test_split[0][:2], k=k, top_k=top_k)


def test_cli_predict_prints_a_line_per_image_and_an_error_line(trained_run, test_split, tmp_path, capsys):
    images, _ = test_split
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        (folder / ("sub" if i % 2 else ".") / f"img{i}.png").write_bytes(images[i])
    (folder / "broken.png").write_bytes(b"not a png")
    Image.open(io.BytesIO(images[5])).save(folder / "img5.jpg")
    code = cli.main(["predict", "--run", str(trained_run), "--k", "2", "--batch-size", "2", str(folder)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1  # one file failed
    assert len(lines) == 7
    errors = [line for line in lines if "error" in line]
    assert [Path(e["path"]).name for e in errors] == ["broken.png"]
    for line in lines:
        if "error" not in line:
            assert set(line) == {"path", "labels", "names", "scores", "set_size"}
            assert line["set_size"] == len(line["labels"]) == len(line["names"]) == len(line["scores"])
    code = cli.main(["predict", "--run", str(trained_run), "--k", "3", "--top-k", str(folder / "img0.png")])
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert code == 0 and line["set_size"] == 3
    code = cli.main(["predict", "--run", str(trained_run), "--rule", "coverage", "--coverage", "0.99",
                     str(folder / "img0.png")])
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    threshold = json.loads((trained_run / "thresholds.json").read_text())["set_rules"]["coverage"]["0.99"]["threshold"]
    assert code == 0 and line["set_size"] >= 1 and min(line["scores"]) >= np.float32(threshold)


def test_cli_predict_errors_are_one_line(trained_run, tmp_path, capsys):
    assert cli.main(["predict", "--run", str(trained_run), "--k", "7", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "avgk: error: k=7 was not calibrated for this run; calibrated K: 1, 2, 3"
    assert cli.main(["predict", "--run", str(tmp_path / "nope"), "--k", "2", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("avgk: error: run directory")
    assert cli.main(["predict", "--run", str(trained_run), str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("avgk: error: avgk predict needs either --k K [--top-k] or --rule NAME "
                                               "--coverage C (one of the two)")
    assert cli.main(["predict", "--run", str(trained_run), "--rule", "raps", "--coverage", "0.9", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("avgk: error: no set rule 'raps' calibrated at coverage 0.9: calibrated "
                                               "are coverage at 0.9, coverage at 0.95, coverage at 0.99, aps_softmax at 0.9")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["tracking.register_model=''"], r"tracking.register_model must be a non-empty name"),
        (["tracking.register_model=m", "tracking.log_model=false"], r"needs tracking.enabled=true and tracking.log_model=true"),
        (["tracking.register_model=m", "tracking.enabled=false"], r"needs tracking.enabled=true"),
    ],
)
def test_register_model_config_is_validated(overrides, match):
    from avgk.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
    assert load_config(None, ["tracking.register_model=avgk-demo"]).tracking.register_model == "avgk-demo"


def test_the_prediction_job_checks_a_set_rule_before_it_starts(trained_run):
    from pipelines.predict_job import check_rule, rule_of

    check_rule(str(trained_run), k=None, top_k=False, rule="coverage", coverage=0.95)
    with pytest.raises(ValueError, match=r"no set rule 'aps' calibrated at coverage 0.95: calibrated are coverage at 0.9"):
        check_rule(str(trained_run), k=None, top_k=False, rule="aps", coverage=0.95)
    with pytest.raises(ValueError, match=r"a set rule needs --rule NAME and --coverage C, without --k or --top-k"):
        check_rule(str(trained_run), k=2, top_k=False, rule="coverage", coverage=0.95)
    with pytest.raises(ValueError, match=r"choose a calibrated K \(--k\) or a set rule \(--rule NAME --coverage C\)"):
        check_rule(str(trained_run), k=None, top_k=False)
    # a part written with one choice is never reused for another
    assert rule_of(k=None, top_k=False, rule="coverage", coverage=0.95) == {"rule": "coverage", "coverage": "0.95"}
    assert rule_of(k=2, top_k=False) == {"k": "2", "top_k": False}
