"""The Ray scoring jobs: exact streamed thresholds over tasks, `avgk evaluate`, `avgk pseudolabel`, offline training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from avgk.config import load_config
from avgk.data.manifest import read_manifest
from avgk.evaluation.metrics import SetMetrics
from avgk.method.pseudo_label_table import read_pseudo_label_table
from avgk.method.pseudo_labels import batch_pseudo_labels
from avgk.method.thresholds import reference_thresholds, round_count
from tests.helpers.runs import ROOT, checkpoint_dirs

pytestmark = [pytest.mark.slow, pytest.mark.ray]
SMOKE = ROOT / "configs" / "smoke.yaml"
KS = [1, 1.5, 2, 3, 5, 10]
ALL_SET_RULES = ("[{rule: coverage}, {rule: aps, coverages: [0.9]}, {rule: raps, coverages: [0.8, 0.99]}, "
                 "{rule: class_coverage, min_count: 30}, {rule: aps, name: aps_softmax, head: softmax, coverages: [0.9, 0.99]}]")


def smoke_config(smoke_shards, storage: Path, *overrides):
    return load_config(SMOKE, [f"data.shards={smoke_shards}", f"run.storage={storage}", *overrides])


def collect(ds, *columns) -> dict[str, np.ndarray]:
    """A small dataset's columns in the test process, sorted by idx (the tests' ground truth only)."""
    rows = {c: [] for c in columns}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for c in columns:
            rows[c].append(batch[c])
    out = {c: np.concatenate(v) for c, v in rows.items()}
    if "idx" in out:
        order = np.argsort(out["idx"])
        out = {c: v[order] for c, v in out.items()}
    return out


# ---------------------------------------------------------------- streamed reductions on a large random matrix


NUM_ROWS, NUM_COLS, NUM_BLOCKS = 40_000, 1_000, 10


def random_block(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([7, seed])
    rows = NUM_ROWS // NUM_BLOCKS
    scores = rng.random((rows, NUM_COLS), dtype=np.float32)
    scores -= 0.5  # negative values too: their keys flip every bit
    return scores, rng.integers(0, NUM_COLS, rows)


def _generate(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    (seed,) = batch["id"]
    scores, labels = random_block(int(seed))
    return {"scores": scores, "label": labels}


def test_thresholds_and_metrics_of_a_random_matrix_over_three_tasks(local_ray):
    """40,000 x 1,000 generated inside tasks (never on the driver): equal to a full sort bit for bit."""
    import ray

    from avgk.evaluation.passes import ThresholdsPass
    from pipelines.reduction import block_groups, run_passes
    from tests.helpers.reductions import metrics_dataset

    ds = ray.data.range(NUM_BLOCKS, override_num_blocks=NUM_BLOCKS).map_batches(_generate, batch_size=1)
    groups = block_groups(ds, 3)
    spec = ThresholdsPass(ks=tuple(KS))
    result = run_passes(ds, spec, groups=groups)
    thresholds = spec.calibrator(result.totals).thresholds()
    for reports in result.reports:  # every pass: 3 tasks sharing all the rows
        assert len(reports) == 3 and all(r.num_rows > 0 for r in reports)
        assert sum(r.num_rows for r in reports) == NUM_ROWS
    assert result.totals[0].dtype == np.int64 and result.totals[0].size == 2 + 65_536

    blocks = [random_block(seed) for seed in range(NUM_BLOCKS)]
    scores_NL = np.concatenate([b[0] for b in blocks])
    labels_N = np.concatenate([b[1] for b in blocks])
    assert thresholds == reference_thresholds(scores_NL, KS)

    metrics = metrics_dataset(ds, num_classes=NUM_COLS, ks=[1, 2], thresholds=thresholds, num_tasks=3)
    expected = SetMetrics(num_classes=NUM_COLS, ks=[1, 2], thresholds=thresholds)
    expected.update(scores_NL=scores_NL, labels_N=labels_N)
    assert metrics.compute() == expected.compute()


def _generate_top(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """random_block's rows in the top-T form a scoring actor emits (pipelines.scoring.score_columns);
    with "flat_row", block 3's first row is flat at the top of the matrix (more top scores than T)."""
    from pipelines.scoring import score_columns

    (seed,), (top_t,), (flat_row,) = batch["id"], batch["top_t"], batch["flat_row"]
    scores, labels = random_block(int(seed))
    if flat_row and int(seed) == 3:
        scores[0] = 0.4995  # above the 40,001-th largest score (~0.499): this row holds 1,000 of the top ranks
    return {"label": labels, **score_columns(scores, labels_N=labels, column="scores", top_t=int(top_t),
                                             with_classes=False)}


def test_top_rows_over_ray_tasks_equal_full_rows_or_raise(local_ray):
    """The same 40,000 x 1,000 random matrix as top-40 rows through Ray tasks: the full rows' lambda_K and metrics
    bit for bit; one flat row among the top scores raises NotExact on the driver instead of a wrong lambda_K."""
    import ray

    from avgk.evaluation.top_scores import NotExact
    from tests.helpers.reductions import calibrate_dataset, metrics_dataset

    def top_dataset(*, flat_row: bool):
        items = [{"id": i, "top_t": 40, "flat_row": flat_row} for i in range(NUM_BLOCKS)]
        return ray.data.from_items(items, override_num_blocks=NUM_BLOCKS).map_batches(_generate_top, batch_size=1)

    blocks = [random_block(seed) for seed in range(NUM_BLOCKS)]
    scores_NL = np.concatenate([b[0] for b in blocks])
    labels_N = np.concatenate([b[1] for b in blocks])
    expected = reference_thresholds(scores_NL, KS)
    top = top_dataset(flat_row=False).materialize()
    assert calibrate_dataset(top, ks=KS, num_tasks=3, top=True, num_classes=NUM_COLS) == expected
    metrics = metrics_dataset(top, num_classes=NUM_COLS, ks=[1, 2], thresholds=expected, num_tasks=3, top=True)
    full = SetMetrics(num_classes=NUM_COLS, ks=[1, 2], thresholds=expected)
    full.update(scores_NL=scores_NL, labels_N=labels_N)
    assert metrics.compute() == full.compute()
    with pytest.raises(NotExact, match=r"K=1.0: the \(m\+1\)-th largest kept score"):
        calibrate_dataset(top_dataset(flat_row=True), ks=KS, num_tasks=3, top=True, num_classes=NUM_COLS)


# ---------------------------------------------------------------- jobs on a trained smoke run


@pytest.fixture(scope="module")
def trained(smoke_shards, tmp_path_factory, local_ray, mlflow_server):
    """configs/smoke.yaml trained (2 epochs, one worker, tracked): the jobs' input, with its own evaluation."""
    from pipelines.train import run_training

    storage = tmp_path_factory.mktemp("scoring") / "runs"
    config = smoke_config(smoke_shards, storage, "run.name=trained", f"tracking.uri={mlflow_server}",
                          "tracking.log_model=false",  # the jobs read the checkpoint, not the logged model
                          f"eval.set_rules={ALL_SET_RULES}")
    run_training(config)
    run_dir = storage / "trained"
    return SimpleNamespace(
        config=config, run_dir=run_dir, tracking_uri=mlflow_server,
        metrics=json.loads((run_dir / "metrics.json").read_text()),
        thresholds=json.loads((run_dir / "thresholds.json").read_text()),
    )


def assert_same_document(actual, expected, path="metrics"):
    if isinstance(expected, dict):
        assert set(actual) == set(expected), (path, set(actual) ^ set(expected))
        for key in expected:
            assert_same_document(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, float):
        assert abs(actual - expected) <= 1e-9, (path, actual, expected)
    else:
        assert actual == expected, (path, actual, expected)


def test_evaluate_equals_the_trainings_evaluation(trained):
    from mlflow.tracking import MlflowClient

    from pipelines.evaluate import run_evaluate

    evaluation = run_evaluate(trained.config, run=str(trained.run_dir), num_actors=2)
    written = json.loads((trained.run_dir / "metrics.json").read_text())
    assert written["val"]["thresholds"] == trained.metrics["val"]["thresholds"]  # bit for bit
    assert json.loads((trained.run_dir / "thresholds.json").read_text()) == trained.thresholds
    assert_same_document(written, trained.metrics)
    assert "oracle_avg_k_accuracy" in written["test"] and written["test"]["num_samples"] == 400
    # the Bayes-optimal sets: every rule calibrated on the true posteriors of val, counted on test's
    assert set(written["test"]["oracle_set_rules"]) == {"coverage", "aps", "raps", "class_coverage", "aps_softmax"}
    # both heads of the two-head model: the rules on the multi-label head and one on the softmax head
    assert {e["head"] for e in written["test"]["set_rules"]["aps"].values()} == {"multilabel"}
    assert {e["head"] for e in written["test"]["set_rules"]["aps_softmax"].values()} == {"softmax"}
    assert evaluation.per_class["num_samples"].sum() == 400

    client = MlflowClient(trained.tracking_uri)
    run_id = (trained.run_dir / "mlflow_run_id.txt").read_text().strip()
    run = client.get_run(run_id)
    assert run.data.tags["avgk.evaluated_checkpoint"] == str(trained.run_dir / "best" / "checkpoint.pt")
    assert run.data.metrics["test_avg_k_accuracy_k2"] == written["test"]["avg_k_accuracy"]["2"]
    raps = written["test"]["set_rules"]["raps"]["0.99"]
    assert run.data.metrics["test_raps_c0.99_coverage"] == raps["coverage"] >= 0.9  # 400 val samples: a loose floor
    mondrian = written["test"]["set_rules"]["class_coverage"]["0.9"]
    assert run.data.metrics["test_class_coverage_c0.9_avg_set_size"] == mondrian["avg_set_size"]
    assert {"metrics.json", "thresholds.json", "per_class.parquet"} <= {a.path for a in client.list_artifacts(run_id)}


def test_coverage_sets_larger_than_top_t_are_counted_exactly_from_top_t_rows(trained):
    """The job's scorers keep 6 scores per row, yet every coverage metric equals the training's full-row one."""
    from avgk.evaluation import passes, set_rules
    from avgk.evaluation.coverage_passes import CoverageMetricsPass
    from pipelines.reduction import ray_runner
    from pipelines.scoring import SetColumns, score_dataset
    from pipelines.scoring_inputs import load_scoring_model

    config = trained.config
    manifest = read_manifest(config.data.shards)
    scoring = load_scoring_model(str(trained.run_dir / "best" / "checkpoint.pt"))

    def score(split, set_columns):
        return score_dataset(scoring, manifest=manifest, split=split, head="multilabel", with_posterior=False,
                             top_t=6, num_actors=2, set_columns=set_columns).materialize()

    groups = set_rules.by_column(config.eval.set_rules, score_head="multilabel")
    assert list(groups) == ["scores", "softmax"]  # the rules on the score head, and one on the softmax head
    val = score("val", SetColumns.calibrating(groups))
    names = val.schema().names
    assert "scores" not in names and "softmax" not in names and names.count("scores_top") == 1
    run = ray_runner({"val": val})
    calibrated = {column: passes.calibrate_set_rules(run, "val", rules=group, num_samples=400, num_classes=20,
                                                     column=column, head=set_rules.head_of(column, score_head="multilabel"))
                  for column, group in groups.items()}
    everything = [rule for rules in calibrated.values() for rule in rules]
    assert set_rules.rules_to_json(everything) == trained.thresholds["set_rules"]  # bit for bit
    test = score("test", SetColumns.counting(calibrated))
    counted = {}
    for column, rules in calibrated.items():
        spec = CoverageMetricsPass(rules=tuple(rules), num_classes=20, freq_bins=config.eval.freq_bins, column=column,
                                   train_class_counts=tuple(manifest.split("train").class_counts))
        counted.update(spec.counts(ray_runner({"test": test}, num_tasks=3)(spec, "test")).compute())
    assert counted == trained.metrics["test"]["set_rules"]
    sizes = counted["coverage"]["0.99"]["set_size_histogram"]
    assert max(int(size) for size in sizes) > 6  # sets the top-6 rows alone could not have counted


def test_job_thresholds_equal_reference_on_smoke_val_scores(trained):
    from pipelines.scoring import score_dataset
    from pipelines.scoring_inputs import load_scoring_model
    from tests.helpers.reductions import calibrate_dataset

    scoring = load_scoring_model(str(checkpoint_dirs(trained.run_dir)[-1] / "checkpoint.pt"))
    # an actor pool of two (the GPU path, here on CPU actors): every row scored once, thresholds exact
    val = score_dataset(scoring, manifest=read_manifest(trained.config.data.shards), split="val", head="multilabel",
                        with_posterior=True, num_actors=2, actors=True).materialize()
    thresholds = calibrate_dataset(val, ks=[1, 1.5, 2, 3], num_tasks=2)
    rows = collect(val, "idx", "scores", "posterior")
    assert rows["idx"].tolist() == list(range(400))  # every val sample scored exactly once
    assert thresholds == reference_thresholds(rows["scores"], [1, 1.5, 2, 3])
    assert calibrate_dataset(val, ks=[2], column="posterior") == reference_thresholds(rows["posterior"], [2])


def test_pseudolabel_job_equals_brute_force(trained):
    from pipelines.pseudolabel import run_pseudolabel
    from pipelines.scoring import score_dataset
    from pipelines.scoring_inputs import load_scoring_model

    selection, uri = run_pseudolabel(trained.config, run=str(trained.run_dir), checkpoint="last", num_actors=1)
    table = read_pseudo_label_table(uri)
    num_samples, k = 1000, trained.config.loss.effective_pseudo_k
    assert table.num_samples == num_samples and table.num_positives == round_count(n=num_samples, k=k)
    meta = table.metadata
    assert meta["num_positives"] == table.num_positives and meta["k"] == k and meta["threshold"] == selection.threshold
    assert meta["checkpoint"] == str(checkpoint_dirs(trained.run_dir)[-1] / "checkpoint.pt")

    scoring = load_scoring_model(meta["checkpoint"])
    train = collect(score_dataset(scoring, manifest=read_manifest(trained.config.data.shards), split="train", head="softmax",
                                  with_posterior=False, num_actors=1), "idx", "label", "scores")
    expected_NL = batch_pseudo_labels(probs=torch.from_numpy(train["scores"]),
                                      labels=torch.from_numpy(train["label"]), k=k).numpy() > 0
    actual_NL = table.targets(np.arange(num_samples), num_classes=20).numpy() > 0
    assert np.array_equal(actual_NL, expected_NL)
    assert actual_NL[np.arange(num_samples), train["label"]].all()  # every true label is in
    assert not list(trained.run_dir.glob(".pseudo_labels.tmp-*"))


def with_eval(config, **changes):
    """`config` with eval fields changed (validated) and tracking off."""
    from avgk.config import Config

    tree = config.to_dict()
    tree["eval"].update(changes)
    tree["tracking"]["enabled"] = False
    return Config.model_validate(tree)


def test_evaluate_on_few_kept_scores_falls_back_and_says_so(trained):
    """eval.top_t=4 of 20 classes with K up to 3: some test set at lambda_K holds more than 4 scores, which no
    top-4 row can count, so the job must score again with full rows, say so, and give the training's
    evaluation. (The proven top-row path through Ray: test_top_rows_over_ray_tasks_equal_full_rows_or_raise; on
    this weak 2-epoch model even top-19 rows fall back, its posteriors being flat.)"""
    from pipelines.evaluate import run_evaluate

    largest_set = max(int(size) for hist in trained.metrics["test"]["set_size_histogram"].values() for size in hist)
    assert largest_set > 4  # what makes top_t=4 unprovable on this model
    for top_t, must_fall_back in ((4, True),):
        lines: list[str] = []
        evaluation = run_evaluate(with_eval(trained.config, top_t=top_t), run=str(trained.run_dir), num_actors=1,
                                  log=lines.append)
        fallback = [line for line in lines if "falling back to full score rows" in line]
        if must_fall_back:
            assert len(fallback) == 1 and fallback[0].startswith("evaluate: top-T score rows cannot prove"), lines
            assert any("scored test: 400 samples" in line and "(full rows)" in line for line in lines), lines
        assert any(f"(top-{top_t} rows)" in line for line in lines), lines
        assert evaluation.metrics["val"]["thresholds"] == trained.metrics["val"]["thresholds"]
        assert_same_document(evaluation.metrics, trained.metrics)


def test_pseudolabel_job_on_top_rows_equals_full_rows(trained):
    """The table from top-4 rows (proven or fallen back) and from eval.score_rows=full equals the default job's."""
    from pipelines.pseudolabel import run_pseudolabel

    tables = {}
    for name, changes in {"default": {}, "top-4": {"top_t": 4}, "full": {"score_rows": "full"}}.items():
        lines: list[str] = []
        run_pseudolabel(with_eval(trained.config, **changes), run=str(trained.run_dir), checkpoint="last",
                        num_actors=1, log=lines.append)
        rows = "full rows" if name == "full" else ("top-4 rows" if name == "top-4" else "top-16 rows")
        assert any(f"({rows})" in line for line in lines), lines
        tables[name] = read_pseudo_label_table(str(trained.run_dir / "pseudo_labels"))
    for name in ("top-4", "full"):
        assert np.array_equal(tables[name].offsets_N1, tables["default"].offsets_N1), name
        assert np.array_equal(tables[name].labels_M, tables["default"].labels_M), name


def test_cli_evaluate_on_the_running_cluster(trained, local_ray, tmp_path):
    """`avgk evaluate CONFIG --run RUN_DIR --checkpoint last` as a user runs it, joining the cluster in RAY_ADDRESS."""
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "pipelines.cli", "evaluate", str(SMOKE), "--run", str(trained.run_dir),
           "--checkpoint", "last", f"data.shards={trained.config.data.shards}", "tracking.enabled=false",
           "eval.num_actors=1"]  # one scoring actor: the multi-actor path is test_evaluate_equals_the_trainings_evaluation's
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "scored val: 400 samples" in proc.stdout and "avg" in proc.stdout
    # progress per pass: the two histogram passes of the val thresholds, the test metrics pass
    assert "val thresholds: pass 2 over 400 rows" in proc.stdout and "test metrics: pass 1 over 400 rows" in proc.stdout
    written = json.loads((trained.run_dir / "metrics.json").read_text())
    assert set(written["val"]["thresholds"]) == {"1", "2", "3"}


@pytest.mark.parametrize(
    "verb, args, message",
    [
        ("evaluate", ["--run", "{tmp}/missing"], "run directory {tmp}/missing does not exist"),
        ("evaluate", ["--run", "{tmp}", "--checkpoint", "{tmp}/none.pt"], "--checkpoint {tmp}/none.pt: no checkpoint file"),
        ("evaluate", ["--run", "{tmp}", "--checkpoint", "best"], "no best checkpoint at {tmp}/best/checkpoint.pt"),
        ("pseudolabel", ["--run", "{tmp}"], "no checkpoint_*/checkpoint.pt in run directory {tmp}"),
    ],
)
def test_cli_bad_inputs_are_one_clear_line(verb, args, message, tmp_path, capsys):
    """The CLI's entry point in process: a bad run or checkpoint fails before any Ray work."""
    from pipelines import cli

    args = [a.format(tmp=tmp_path) for a in args]
    assert cli.main([verb, str(SMOKE), *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("avgk: error:")]
    assert len(lines) == 1 and message.format(tmp=tmp_path) in lines[0], err[-2000:]
    assert "Traceback" not in err


# ---------------------------------------------------------------- offline pseudo-labels in training


# Two DDP workers exercise everything one does plus the all-reduced selection and table
# assembly; one worker (the default) is left out to keep this file under 4 minutes on 2 cores.
@pytest.mark.parametrize("workers", [2])
def test_offline_pseudo_labels_train_and_match_the_job(workers, smoke_shards, tmp_path, local_ray):
    """Epoch 1 online, epoch 2 from the global table; the table equals `avgk pseudolabel` on the epoch-1 checkpoint."""
    from pipelines.pseudolabel import run_pseudolabel
    from pipelines.train import run_training

    config = smoke_config(smoke_shards, tmp_path / "runs", f"run.name=offline{workers}", "tracking.enabled=false",
                          f"train.num_workers={workers}", "loss.pseudo_labels=offline", "loss.refresh_epochs=1")
    run_training(config)
    run_dir = tmp_path / "runs" / f"offline{workers}"
    assert set(json.loads((run_dir / "metrics.json").read_text())["test"]["avg_k_accuracy"]) == {"1", "2", "3"}
    in_training = read_pseudo_label_table(str(run_dir / "pseudo_labels"))
    assert in_training.metadata["source"] == "training" and in_training.metadata["trained_epochs"] == 1
    assert in_training.num_positives == round_count(n=1000, k=2)

    first = checkpoint_dirs(run_dir)[0]  # the weights the table was computed with
    selection, _ = run_pseudolabel(config, run=str(run_dir), checkpoint=str(first), num_actors=1)
    job = read_pseudo_label_table(str(run_dir / "pseudo_labels"))
    assert selection.threshold == in_training.metadata["threshold"]
    assert np.array_equal(job.offsets_N1, in_training.offsets_N1)
    assert np.array_equal(job.labels_M, in_training.labels_M)


def test_gpu_scoring_on_a_cluster_without_gpu_waits_then_says_so(local_ray):
    """An autoscaling cluster may have no GPU when the job starts: ask, wait eval.gpu_wait_seconds, then one clear error."""
    from pipelines.scoring import plan_scoring

    with pytest.raises(ValueError, match=r"has no GPU \(waited eval.gpu_wait_seconds=0.5 s"):
        plan_scoring(use_gpu=True, gpu_wait_seconds=0.5)
