"""Pipeline specs: validation in one line before anything starts, the expanded graph, fingerprints and
states, --dry-run on every shipped spec, and the comparison's paired intervals."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from avgk.experiments import pipeline_state as ps
from avgk.experiments.compare import RunEntry, paired_differences, rows_of
from avgk.experiments.pipeline_plan import load_pipeline
from avgk.experiments.pipeline_spec import PipelineSpecError
from tests.helpers.runs import ROOT

SPECS = sorted((ROOT / "configs" / "pipelines").glob("*.yaml"))
TWO_METHODS = {"two_head": {"loss.name": "two_head"}, "ce": {"loss.name": "ce"}}


def write_spec(tmp_path: Path, stages: dict, **extra) -> Path:
    spec = {"name": "p", "base": str(ROOT / "configs" / "smoke.yaml"),
            "overrides": {"run.storage": str(tmp_path / "runs"), "data.shards": str(tmp_path / "shards")},
            "stages": stages, **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


DEMO_LIKE = {
    "data": {"verb": "prepare"},
    "train": {"verb": "train", "needs": ["data"], "matrix": {"method": TWO_METHODS}},
    "compare": {"verb": "compare", "needs": ["train"], "with": {"reference": "ce"}},
}


@pytest.mark.parametrize(
    "stages, message",
    [
        ({"data": {"verb": "prepar"}}, "unknown verb 'prepar'"),
        ({"a": {"verb": "train", "needs": ["b"]}, "b": {"verb": "evaluate", "needs": ["a"]}},
         "stages form a cycle: a -> b -> a"),
        ({"train": {"verb": "train", "needs": ["data"]}}, "stages.train.needs names 'data', which no stage produces"),
        ({"data": {"verb": "prepare"}, "cmp": {"verb": "compare", "needs": ["data"], "with": {"reference": "ce"}}},
         "stages.cmp (compare) cannot read stage 'data' (prepare)"),
        ({"train": {"verb": "train", "overrides": {"train.lrr": 1}}}, "unknown config key 'train.lrr'"),
        ({"train": {"verb": "train", "matrix": {"m": {"a": {"run.name": "x"}}}}},
         "stages.train.matrix.m.a sets 'run.name': the runner names every cell's run folder"),
        ({"train": {"verb": "train", "with": {"sweep": "x"}}}, "with: ['sweep'] are not options of verb 'train'"),
        ({"data": {"verb": "prepare"}, "train": {"verb": "train", "needs": ["data"], "matrix": {"method": TWO_METHODS}},
          "cmp": {"verb": "compare", "needs": ["train"], "with": {"reference": "softmax"}}},
         "cmp.with.reference='softmax' is not a label of the runs it compares (ce, two_head)"),
        ({"data": {"verb": "prepare"}, "train": {"verb": "train", "needs": ["data"], "matrix": {"method": TWO_METHODS}},
          "cmp": {"verb": "compare", "needs": ["train"], "with": {"reference": "ce", "k": 7}}},
         "cmp: K=7 is not among train[two_head]'s eval.ks"),
        ({"train": {"verb": "train", "matrix": {"seed": {"key": "train.seed", "values": [0, "0"]}}}},
         "stages.train: two cells are named 'train[0]'"),
        ({"data": {"verb": "prepare", "matrix": {"a": {"key": "data.synthetic.ambiguity_rate", "values": [0.1, 0.5]}}}},
         "data[0.1] and data[0.5] write different data sets into one data.shards="),
        ({"train": {"verb": "train", "matrix": {"method": TWO_METHODS}},
          "ev": {"verb": "evaluate", "needs": ["train"]}},
         "ev (evaluate) reads one trained run, and its needs give it 2"),
        ({"train": {"verb": "train", "overrides": {"train.lr": -1}}}, "train.lr"),
        ({"train": {"verb": "train", "matrix": {"method": TWO_METHODS}, "exclude": [{"seed": 0}]}},
         "stages.train.exclude[0] names dimension 'seed', not one of its matrix (method)"),
        ({"train": {"verb": "train", "matrix": {"method": TWO_METHODS}, "exclude": [{"method": ["ce", "softmax"]}]}},
         "stages.train.exclude[0].method: ['softmax'] are not labels of that dimension (two_head, ce)"),
        ({"train": {"verb": "train", "matrix": {"method": TWO_METHODS}, "exclude": [{"method": ["ce", "two_head"]}]}},
         "stages.train.exclude leaves no cell of its matrix"),
        ({"train": {"verb": "train", "matrix": {"method": {"ce": {"loss.name": "ce", "with.sweep": "s.yaml"}}}}},
         "stages.train.matrix sets with.sweep, not an option of verb 'train' (its options: none)"),
        ({"data": {"verb": "prepare"}, "tune": {"verb": "tune", "needs": ["data"], "matrix": {"method": {
            "ce": {"loss.name": "ce", "with.sweep": "s.yaml"}, "two_head": {"loss.name": "two_head"}}}}},
         "stages.tune: a tune stage needs with.sweep (a sweep YAML), in its with: or in each matrix label's"),
        ({"pre": {"verb": "train", "matrix": {"method": TWO_METHODS}}, "ft": {"verb": "train", "needs": ["pre"]}},
         "ft starts from one trained run (model.pretrained), and its needs give it 2"),
        ({"train": {"verb": "train"}, "label": {"verb": "predict", "needs": ["train"]}},
         "stages.label: a predict stage needs with.inputs, a list of files, folders, bucket prefixes or one shard set"),
        ({"train": {"verb": "train", "matrix": {"method": TWO_METHODS}},
          "label": {"verb": "predict", "needs": ["train"], "with": {"inputs": ["photos/"]}}},
         "label (predict) labels with one model: it needs one compare, or one trained run per cell (it reads 2)"),
    ],
)
def test_a_bad_spec_is_one_line_exit_2_and_nothing_started(stages, message, tmp_path, capsys):
    from pipelines import cli

    path = write_spec(tmp_path, stages)
    assert cli.main(["pipeline", str(path)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("avgk: error:")]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # no pipeline folder, no MLflow store, no run


def test_a_bad_spec_stops_before_ray_torch_or_mlflow_load(tmp_path):
    """In a fresh process: the error line comes and none of the heavy libraries were imported."""
    import subprocess

    path = write_spec(tmp_path, {"train": {"verb": "train", "needs": ["nope"]}})
    code = ("import sys\nfrom pipelines import cli\nrc = cli.main(['pipeline', sys.argv[1]])\n"
            "heavy = sorted(m for m in ('ray', 'torch', 'mlflow') if m in sys.modules)\n"
            "print('HEAVY', heavy)\nraise SystemExit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stdout, proc.stdout
    assert "stages.train.needs names 'nope'" in proc.stderr


def test_matrix_cells_and_their_inputs(tmp_path):
    stages = {
        "data": {"verb": "prepare"},
        "tune": {"verb": "tune", "needs": ["data"], "with": {"sweep": str(ROOT / "configs/sweeps/smoke.yaml")},
                 "matrix": {"method": TWO_METHODS}},
        "train": {"verb": "train", "needs": ["data", "tune"],
                  "matrix": {"method": TWO_METHODS, "seed": {"key": "train.seed", "values": [0, 1]}}},
        "compare": {"verb": "compare", "needs": ["train"], "with": {"reference": "ce"}},
    }
    plan = load_pipeline(write_spec(tmp_path, stages))
    assert list(plan.cells) == ["data", "tune[two_head]", "tune[ce]", "train[two_head-0]", "train[two_head-1]",
                                "train[ce-0]", "train[ce-1]", "compare"]
    assert plan.cells["train[ce-1]"].inputs == ("data", "tune[ce]")  # its own method's tuned values
    assert plan.cells["train[ce-1]"].config.train.seed == 1 and plan.cells["train[ce-1]"].config.loss.name == "ce"
    assert set(plan.cells["compare"].inputs) == {c for c in plan.cells if c.startswith("train[")}


def test_a_change_to_one_method_changes_only_its_cells_and_what_depends_on_them(tmp_path):
    before = load_pipeline(write_spec(tmp_path, DEMO_LIKE))
    changed = {**DEMO_LIKE, "train": {**DEMO_LIKE["train"], "matrix": {"method": {
        "two_head": {"loss.name": "two_head", "train.lr": 0.01}, "ce": {"loss.name": "ce"}}}}}
    after = load_pipeline(write_spec(tmp_path, changed))
    a, b = ps.fingerprints(before, code="c"), ps.fingerprints(after, code="c")
    assert {cid for cid in a if a[cid]["fingerprint"] != b[cid]["fingerprint"]} == {"train[two_head]", "compare"}
    # where results go and how they are reported are not part of a fingerprint; the code is
    moved = load_pipeline(write_spec(tmp_path, DEMO_LIKE), ["tracking.enabled=false"])
    assert ps.fingerprints(moved, code="c") == a
    assert all(x["fingerprint"] != y["fingerprint"] for x, y in zip(a.values(), ps.fingerprints(before, code="d").values(),
                                                                    strict=True))


def test_states_from_records(tmp_path):
    plan = load_pipeline(write_spec(tmp_path, DEMO_LIKE))
    prints = ps.fingerprints(plan, code="c")
    assert {s.describe() for s in ps.states(plan, prints).values()} == {"to run (new)"}
    data, train = plan.cells["data"], plan.cells["train[two_head]"]
    ps.write_record(ps.cell_dir(plan, data, prints["data"]["fingerprint"]),
                    {"status": "finished", "parts": prints["data"]["parts"], "outputs": {"shards": "x"}})
    ps.write_record(ps.cell_dir(plan, train, prints[train.id]["fingerprint"]),
                    {"status": "running", "parts": prints[train.id]["parts"]})
    states = ps.states(plan, prints)
    assert states["data"].describe() == "done" and states["train[two_head]"].describe() == "resume (interrupted)"
    assert states["train[ce]"].describe() == "to run (new)"
    # a config change: the old finished record says what changed
    new_plan = load_pipeline(write_spec(tmp_path, DEMO_LIKE), ["data.synthetic.num_train=900"])
    new_prints = ps.fingerprints(new_plan, code="c")
    new_states = ps.states(new_plan, new_prints)
    assert new_states["data"].describe() == "to run (changed config)"
    ps.write_record(ps.cell_dir(plan, train, prints[train.id]["fingerprint"]),
                    {"status": "finished", "parts": prints[train.id]["parts"]})
    assert ps.states(new_plan, new_prints)["train[two_head]"].describe() == "to run (changed input)"


@pytest.mark.parametrize("spec", SPECS, ids=[p.name for p in SPECS])
def test_dry_run_of_every_shipped_spec(spec, tmp_path, capsys, monkeypatch):
    """As shipped: every stage listed with its state; nothing written; exit 0 (records in an object store
    that cannot be reached are "record unreachable", still exit 0)."""
    from pipelines import cli

    monkeypatch.chdir(tmp_path)  # a relative run.storage lands here, and must not be created
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there: refused at once
    assert cli.main(["pipeline", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    plan = load_pipeline(spec)
    for name in plan.spec.stages:
        assert f"  {name} ({plan.spec.stages[name].verb})" in out, out
    assert out.count("to run (new)") + out.count("record unreachable") == len(plan.cells), out
    assert not list(tmp_path.iterdir())


def test_t_interval_of_paired_differences():
    entries = [RunEntry(method=m, seed=s, run_dir=f"{m}{s}", metrics={"test": {"avg_k_accuracy": {"2": v}}})
               for m, s, v in [("ce", 0, 0.50), ("ce", 1, 0.60), ("ce", 2, 0.55),
                               ("th", 0, 0.52), ("th", 1, 0.61), ("th", 2, 0.59), ("th", 3, 0.9)]]
    rows = rows_of(entries)
    diffs = paired_differences(rows, reference="ce", column="avg_k_accuracy@2").set_index("method").loc["th"]
    d = [0.02, 0.01, 0.04]  # seed 3 has no ce run: not paired
    mean, std = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    half = 4.302652729911275 * std / math.sqrt(3)  # t(0.975, 2)
    assert diffs["pairs"] == 3 and diffs["diff"] == pytest.approx(mean) and diffs["std"] == pytest.approx(std)
    assert (diffs["low"], diffs["high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    one = paired_differences(rows[rows["seed"] == 0], reference="ce", column="avg_k_accuracy@2")
    assert one["pairs"].tolist() == [1] and math.isnan(one["low"].iloc[0])  # one pair: no interval
    with pytest.raises(ValueError, match=r"two runs share method and seed \[\('ce', 0\)\]"):
        rows_of([*entries, entries[0]])
    assert isinstance(rows, pd.DataFrame)


def test_only_and_from_select_stages_and_refuse_unfinished_inputs(tmp_path, capsys):
    from pipelines import cli

    path = write_spec(tmp_path, DEMO_LIKE)
    assert cli.main(["pipeline", str(path), "--from", "train", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "  data (prepare)  [not selected]" in out and "  train (train) <- data\n" in out
    assert cli.main(["pipeline", str(path), "--only", "compare"]) == 2
    err = capsys.readouterr().err
    assert "avgk: error: compare needs ('train[two_head]', 'train[ce]') finished first" in err
    assert cli.main(["pipeline", str(path), "--only", "nope"]) == 2
    assert "--only 'nope': no such stage (stages: data, train, compare)" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def _fake_run(folder: Path, *, loss: str, seed: int, acc: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"loss": {"name": loss, "k": 2}, "train": {"seed": seed}}))
    test = {"avg_k_accuracy": {"1": acc / 2, "2": acc}, "macro_avg_k_accuracy": {"1": acc / 3, "2": acc / 2},
            "top_k_accuracy": {"1": acc / 2, "2": acc}, "avg_set_size": {"1": 1.0, "2": 2.0}}
    (folder / "metrics.json").write_text(json.dumps({"ks": [1, 2], "test": test}))
    return folder


def test_avgk_compare_pairs_runs_by_seed_and_writes_tables_and_a_figure(tmp_path, capsys):
    from pipelines import cli

    runs = [f"{loss}={_fake_run(tmp_path / f'{loss}{seed}', loss=loss, seed=seed, acc=acc)}"
            for loss, seed, acc in [("ce", 0, 0.50), ("ce", 1, 0.60), ("two_head", 0, 0.55), ("two_head", 1, 0.62)]]
    out_dir = tmp_path / "cmp"
    assert cli.main(["compare", *runs, "--reference", "ce", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "| two_head | 2 | 58.50 |" in out and "+3.50 (2 pairs)" in out  # mean of +5 and +2 points
    assert "best mean test avg-2: two_head" in out
    assert {p.name for p in out_dir.iterdir()} == {"comparison.md", "comparison.csv", "differences_avg_k.png"}
    assert cli.main(["compare", runs[0], "--reference", "ce", "--out", str(out_dir)]) == 2
    assert "compare needs runs of at least two methods, got ['ce']" in capsys.readouterr().err
    assert cli.main(["compare", f"x={tmp_path / 'none'}", runs[0], "--reference", "ce"]) == 2
    assert f"{tmp_path / 'none'}: no metrics.json" in capsys.readouterr().err
    (tmp_path / "ce0" / "metrics.json").write_text("{")
    assert cli.main(["compare", *runs, "--reference", "ce", "--out", str(out_dir)]) == 2
    assert f"{tmp_path / 'ce0'}/metrics.json is not valid JSON" in capsys.readouterr().err


def test_a_tune_cell_fingerprints_its_sweep_file(tmp_path, capsys):
    """Editing the sweep a tune stage names reruns the tune stage (and what it feeds), not only editing the spec."""
    from pipelines import cli

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text((ROOT / "configs" / "sweeps" / "smoke.yaml").read_text().replace("../smoke.yaml",
                                                                                      str(ROOT / "configs" / "smoke.yaml")))
    stages = {"data": {"verb": "prepare"},
              "tune": {"verb": "tune", "needs": ["data"], "with": {"sweep": str(sweep)}},
              "train": {"verb": "train", "needs": ["data", "tune"]}}
    path = write_spec(tmp_path, stages)

    def prints() -> dict[str, str]:
        assert cli.main(["pipeline", str(path), "--dry-run"]) == 0
        lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("    -")]
        return {name: line[-1] for name, line in zip(("data", "tune", "train"), lines, strict=True)}

    before = prints()
    sweep.write_text(sweep.read_text().replace("num_samples: 2", "num_samples: 3"))
    after = prints()
    assert before["data"] == after["data"]
    assert before["tune"] != after["tune"] and before["train"] != after["train"]


def test_an_override_of_one_stage_leaves_a_yaml_anchor_shared_with_others_alone():
    """configs/pipelines/smoke.yaml shares its methods (&methods) between tune, train and pseudolabel."""
    # a method added to train alone has no tuned values to read: refused, because tune did not gain it too
    with pytest.raises(PipelineSpecError, match=r"stages.train\[an-0\] matches no cell of stage 'tune'"):
        load_pipeline(ROOT / "configs" / "pipelines" / "smoke.yaml", ["stages.train.matrix.method.an={loss.name: an}"])


def test_exclude_drops_combinations_and_a_label_may_set_its_cells_options(tmp_path):
    """The studies' matrices: a dimension left out for some labels (exclude), a search space per method (with.)."""
    sweeps = {name: str(ROOT / "configs" / "sweeps" / f"{name}.yaml") for name in ("smoke", "two_head")}
    stages = {
        "data": {"verb": "prepare"},
        "tune": {"verb": "tune", "needs": ["data"], "with": {"num_samples": 1}, "matrix": {"method": {
            "ce": {"loss.name": "ce", "with.sweep": sweeps["smoke"]},
            "two_head": {"loss.name": "two_head", "with.sweep": sweeps["two_head"], "with.num_samples": 3}}}},
        "train": {"verb": "train", "needs": ["data", "tune"],
                  "matrix": {"method": TWO_METHODS, "k": {"key": "loss.k", "values": [2, 3]},
                             "seed": {"key": "train.seed", "values": [0, 1]}},
                  "exclude": [{"method": "ce", "k": 3}, {"k": [3], "seed": [1]}]},
    }
    plan = load_pipeline(write_spec(tmp_path, stages, **{"x-anchors": {"a": 1}}))  # x-...: the author's, skipped
    assert [c for c in plan.cells if c.startswith("train[")] == [
        "train[two_head-2-0]", "train[two_head-2-1]", "train[two_head-3-0]", "train[ce-2-0]", "train[ce-2-1]"]
    ce, two_head = plan.cells["tune[ce]"], plan.cells["tune[two_head]"]
    assert (ce.options["sweep"], ce.options["num_samples"]) == (sweeps["smoke"], 1)  # the stage's with: as default
    assert (two_head.options["sweep"], two_head.options["num_samples"]) == (sweeps["two_head"], 3)
    assert "with.sweep" not in two_head.values and two_head.config.loss.name == "two_head"
    assert ps.fingerprints(plan, code="c")["tune[ce]"]["parts"]["options"] != \
        ps.fingerprints(plan, code="c")["tune[two_head]"]["parts"]["options"]


def test_a_train_that_needs_a_train_starts_from_its_run(tmp_path):
    """Fine-tuning after pretraining: the needed run's directory becomes model.pretrained, its fingerprint an input."""
    from pipelines.pipeline_cells import Runner

    stages = {"data": {"verb": "prepare"}, "pre": {"verb": "train", "needs": ["data"], "overrides": {"loss.name": "ce"}},
              "ft": {"verb": "train", "needs": ["data", "pre"], "matrix": {"method": TWO_METHODS}}}
    plan = load_pipeline(write_spec(tmp_path, stages))
    assert plan.cells["ft[ce]"].inputs == ("data", "pre")
    prints = ps.fingerprints(plan, code="c")
    runner = Runner(plan, prints, uri=None, parent_run_id=None, spec_dir=None, log=print)
    runner.outputs = {"data": {"shards": str(tmp_path / "shards")}, "pre": {"run_dir": str(tmp_path / "pre-run")}}
    config = runner.cell_config(plan.cells["ft[two_head]"])
    assert config.model.pretrained == str(tmp_path / "pre-run") and config.loss.name == "two_head"
    assert runner.cell_config(plan.cells["pre"]).model.pretrained is None
    changed = load_pipeline(write_spec(tmp_path, {**stages, "pre": {**stages["pre"], "overrides": {"loss.name": "an"}}}))
    after = ps.fingerprints(changed, code="c")
    assert after["ft[ce]"]["fingerprint"] != prints["ft[ce]"]["fingerprint"]  # a new pretraining: fine-tune again


def test_compare_reads_each_runs_history_for_best_epochs_and_val_curves(tmp_path, capsys):
    from pipelines import cli

    runs = []
    for loss, seed, acc, curve in [("ce", 0, 0.50, [0.3, 0.5, 0.4]), ("ce", 1, 0.60, [0.2, 0.4, 0.6]),
                                   ("two_head", 0, 0.55, [0.1, 0.6, 0.5]), ("two_head", 1, 0.62, [0.5, 0.4, 0.3])]:
        folder = _fake_run(tmp_path / f"{loss}{seed}", loss=loss, seed=seed, acc=acc)
        (folder / "history.json").write_text(json.dumps([{"epoch": e + 1, "val_avg_k_accuracy": v}
                                                         for e, v in enumerate(curve)]))
        runs.append(f"{loss}={folder}")
    out_dir = tmp_path / "cmp"
    assert cli.main(["compare", *runs, "--reference", "ce", "--out", str(out_dir)]) == 0
    capsys.readouterr()
    text = (out_dir / "comparison.md").read_text()
    assert "| ce | 3 | 2, 3 |" in text and "| two_head | 3 | 2, 1 |" in text  # best epochs by seed
    assert (out_dir / "val_curves.png").stat().st_size > 0
