"""avgk.inference.serving.AvgKSetModel in process: batches, and bad requests as INVALID_PARAMETER_VALUE naming the rows."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from avgk.inference.predict import SetPredictor
from avgk.inference.serving import AvgKSetModel
from tests.helpers.runs import read_split


@pytest.fixture(scope="module")
def images(predict_smoke_run) -> list[bytes]:
    return read_split(predict_smoke_run[0], "test")[0][:7]


@pytest.fixture(scope="module")
def model(predict_smoke_run) -> AvgKSetModel:
    """The pyfunc model around a predictor that scores 3 images per batch (7 rows: batches 3, 3, 1)."""
    model = AvgKSetModel()
    model.predictor = SetPredictor.from_run(str(predict_smoke_run[1]), "best", batch_size=3)
    return model


def test_rows_in_batches_give_the_predictors_sets(model, images, predict_smoke_run):
    out = model.predict(None, pd.DataFrame({"image": images}), params={"k": 2.0})
    expected = SetPredictor.from_run(str(predict_smoke_run[1]), "best").predict(images, k=2)
    served = [json.loads(s) for s in out["label_set"]]
    assert [s["labels"] for s in served] == [s.ids for s in expected]
    assert [s["names"] for s in served] == [s.names for s in expected]
    for row, (a, b) in enumerate(zip(served, expected, strict=True)):
        assert a["scores"] == pytest.approx(b.scores, abs=1e-6), f"row {row}"


def test_a_served_model_gives_the_sets_of_a_calibrated_coverage_rule(model, images, predict_smoke_run):
    out = model.predict(None, pd.DataFrame({"image": images}), params={"rule": "coverage", "coverage": 0.95})
    expected = SetPredictor.from_run(str(predict_smoke_run[1]), "best").predict(images, rule="coverage", coverage=0.95)
    assert [json.loads(s)["labels"] for s in out["label_set"]] == [s.ids for s in expected]


@pytest.mark.parametrize(
    "bad_rows, params, match",
    [
        ({1: b"not an image", 5: b""}, {"k": 2.0},
         r"column 'image' must hold encoded images .* 2 of 7 rows do not: "
         r"row 1: UnidentifiedImageError \(not an image format PIL reads\); row 5: UnidentifiedImageError"),
        ({6: "half"}, {"k": 2.0}, r"1 of 7 rows do not: row 6: OSError: .*truncated"),
        ({}, {"k": 1.5}, r"k=1.5 was not calibrated for this run; calibrated K: 1, 2, 3"),
        ({}, {"k": 2.5, "top_k": True}, r"top-K needs an integer k in \[1, 20\], got 2.5"),
        ({}, {"rule": "aps", "coverage": 0.9}, r"no set rule 'aps' calibrated at coverage 0.9: calibrated are coverage at 0.9"),
    ],
    ids=["not-images", "truncated", "uncalibrated-k", "fractional-top-k", "uncalibrated-rule"],
)
def test_bad_request_is_an_invalid_parameter_naming_it(model, images, bad_rows, params, match):
    rows = list(images)
    for row, value in bad_rows.items():
        rows[row] = rows[row][: len(rows[row]) // 2] if value == "half" else value
    with pytest.raises(MlflowException, match=match) as caught:
        model.predict(None, pd.DataFrame({"image": rows}), params=params)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE", caught.value.error_code
