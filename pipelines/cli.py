"""The `avgk` console script: avgk <verb> CONFIG [key.sub=value ...]."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from avgk.config import Config, ConfigError, load_config
from avgk.runtime import console, guardian
from avgk.runtime.safe_fs import DiskFullError, OutageError
from avgk.runtime.storage import StorageError
from pipelines import cli_support
from pipelines.cli_support import Terminated, one_line, root_cause, terminate, version

if TYPE_CHECKING:
    from avgk.experiments.pipeline_plan import Plan

# Ray prints a banner per worker and a deprecation hint per run; keep a person's terminal readable.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_MININTERVAL", "5")
if not os.environ.get("RAY_ADDRESS"):
    # A local Ray stays on loopback: without this, Ray reports (and resolves 127.0.0.1 to) the
    # machine's routable address.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


# Each verb validates its config before importing torch or Ray, so a config error answers at once.


def cmd_prepare(args: argparse.Namespace) -> int:
    config = _config(args)
    from avgk.data.prepare import prepare

    manifest = prepare(config)
    counts = ", ".join(f"{split} {info.num_samples}" for split, info in manifest.splits.items())
    print(f"shards ready in {config.data.shards}: {manifest.num_classes} classes; {counts}")
    return 0


def _check_before_start(config: Config) -> None:
    """avgk.training.preflight.check_before_start before torch and Ray are imported (a timm name imports torch)."""
    from avgk.records.runs import with_absolute_paths
    from avgk.training.preflight import check_before_start

    check_before_start(with_absolute_paths(config))


def cmd_train(args: argparse.Namespace) -> int:
    config = _config(args)
    _check_before_start(config)
    from avgk.experiments.summary import format_summary
    from pipelines.train import run_training

    evaluation = run_training(config)
    print(f"run directory: {config.run_dir}")
    if evaluation is not None:
        print(format_summary({config.loss.name: evaluation.metrics}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    config = _config(args)
    from avgk.experiments.summary import format_summary
    from pipelines.evaluate import run_evaluate

    evaluation = run_evaluate(config, run=args.run, checkpoint=args.checkpoint)
    print(format_summary({config.loss.name: evaluation.metrics}))
    return 0


def cmd_pseudolabel(args: argparse.Namespace) -> int:
    config = _config(args)
    from pipelines.pseudolabel import run_pseudolabel

    run_pseudolabel(config, run=args.run, checkpoint=args.checkpoint)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from avgk.inference.predict import run_predict

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if (args.k is None) == (args.rule is None and args.coverage is None):
        raise ValueError("avgk predict needs either --k K [--top-k] or --rule NAME --coverage C (one of the two)")
    from avgk.inference.prediction_parts import needs_job

    if args.out is not None or any(needs_job(item) for item in args.paths):
        from pipelines.predict_job import run_predict_job

        summary = run_predict_job(run=args.run, k=args.k, inputs=args.paths, out=args.out, split=args.split,
                                  top_k=args.top_k, batch_size=args.batch_size, checkpoint=args.checkpoint, rule=args.rule,
                                  num_parts=args.parts, num_actors=args.num_actors, coverage=args.coverage)
        return 1 if summary.failed else 0
    num_failed = run_predict(
        run=args.run, k=args.k, paths=args.paths, top_k=args.top_k,
        batch_size=args.batch_size, checkpoint=args.checkpoint, rule=args.rule, coverage=args.coverage,
    )
    return 1 if num_failed else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pipelines.serve import run_serve

    run_serve(run=args.run, checkpoint=args.checkpoint, replicas=args.replicas, max_batch_size=args.max_batch_size,
              batch_wait_ms=args.batch_wait_ms, host=args.host, port=args.port)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from avgk.experiments.report import run_report

    print(run_report(args.runs, out=args.out))
    print(f"report.md and figures in {args.out}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from avgk.experiments.sweep_config import load_sweep
    from pipelines.tune import run_sweep

    sweep, base = load_sweep(args.config, args.overrides)
    result = run_sweep(sweep, base)
    print(f"sweep directory: {result.root}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from avgk.experiments.study_config import load_study
    from pipelines.study import cmd_summary, main_log, run_study

    study, base, cells = load_study(args.config, args.overrides)
    result = run_study(study, base, cells, log=main_log)
    if not result.rows.empty:
        print((Path(result.root) / "summary.md").read_text())
    print(cmd_summary(result))
    return 1 if result.failed else 0


def cmd_config(args: argparse.Namespace) -> int:
    """The resolved config a run would use (YAML), or every key with its type, default and description."""
    import yaml

    from avgk.config import config_keys

    if args.keys:
        for key, kind, default, description in config_keys():
            print(f"{key}  ({kind}, default {default!r})\n    {description}" if description else
                  f"{key}  ({kind}, default {default!r})")
        return 0
    print(yaml.safe_dump(_config(args).to_dict(), sort_keys=False), end="")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from avgk.experiments.pipeline_plan import load_pipeline

    plan = load_pipeline(args.config, args.overrides)  # a bad spec answers before Ray, torch or MLflow load
    if args.export == "argo":
        return export_workflow(plan, args)
    from pipelines.pipeline import run_pipeline

    result = run_pipeline(args.config, args.overrides, dry_run=args.dry_run, only=args.only, start=args.start)
    return 1 if result.failed else 0


def export_workflow(plan: Plan, args: argparse.Namespace) -> int:
    """The spec as an Argo Workflow on stdout (avgk.experiments.argo_export); nothing runs."""
    from avgk.experiments.argo_export import workflow_yaml

    if args.dry_run or args.only or args.start:
        raise ConfigError("--export argo writes the whole graph and runs nothing: drop --dry-run, --only and --from")
    sys.stdout.write(workflow_yaml(plan, spec_path=args.config, overrides=list(args.overrides),
                                   template_path=args.rayjob_template))
    print(f"avgk: an Argo Workflow of {len(plan.stage_order)} stage(s), a RayJob each (infra/README.md, step 9)", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pipelines.compare import parse_runs, run_compare

    runs = parse_runs(args.runs)
    comparison = run_compare(runs, reference=args.reference, out=args.out, k=args.k)
    print(comparison.per_run)
    print()
    print(comparison.table)
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from pipelines.compare import run_register

    run_register(args.run, name=args.name, checkpoint=args.checkpoint)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from avgk.runtime import outbox

    roots = [Path(p) for p in args.paths] or [outbox.default_root()]
    missing = [str(p) for p in roots if not p.exists() and p != outbox.default_root()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} does not exist: give a run directory, a folder of runs or an outbox")
    sent = left = 0
    for root in roots:
        done, waiting = outbox.deliver_all(root, timeout_s=args.wait)
        sent, left = sent + done, left + waiting
    print(f"avgk sync: {sent} record(s) delivered"
          + (f"; {left} still wait: the tracking server does not answer (try again later)" if left else ""))
    return 1 if left else 0


def cmd_demo(args: argparse.Namespace) -> int:
    load_config(None, args.overrides)  # fail fast, before torch and Ray are imported
    from pipelines.demo import run_demo

    run_demo(args.overrides)
    return 0


def _add_config_args(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    if optional:
        parser.add_argument("config", nargs="?", default=None, help="YAML config (default: the embedded defaults)")
    else:
        parser.add_argument("config", help="YAML config file, e.g. configs/smoke.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=3")


def _add_checkpoint_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", metavar="best|last|PATH", default=None,
        help="best (<run>/best), last (newest checkpoint_*), or a checkpoint file or folder "
             "(default: the run's eval.checkpoint: the one its final evaluation and thresholds used)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avgk", description="Average-K classifiers at cluster scale.")
    parser.add_argument("--version", action="version", version=f"avgk {version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every line Ray and MLflow print (by default avgk lowers the ones a user cannot act on)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs: list[tuple[str, str, Callable[[argparse.Namespace], int], bool]] = [
        ("prepare", "convert data.source into WebDataset shards + manifest at data.shards", cmd_prepare, False),
        ("train", "train on Ray Train (data.*, model.*, loss.*, train.*), evaluate on test", cmd_train, False),
    ]
    for name, help_text, func, optional in verbs:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_args(p, optional=optional)
        p.set_defaults(func=func)
    run_jobs: list[tuple[str, str, Callable[[argparse.Namespace], int]]] = [
        ("evaluate", "score val and test with a run's checkpoint on Ray: thresholds.json, metrics.json, "
         "per_class.parquet into the run directory (and its MLflow run)", cmd_evaluate),
        ("pseudolabel", "global pseudo-labels of the training split from a run's checkpoint on Ray: "
         "<run>/pseudo_labels/*.parquet", cmd_pseudolabel),
    ]
    for name, help_text, func in run_jobs:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_args(p)
        p.add_argument("--run", metavar="RUN_DIR", default=None,
                       help="the training's run directory (default: run.storage/run.name of CONFIG)")
        _add_checkpoint_arg(p)
        p.set_defaults(func=func)
    predict = sub.add_parser(
        "predict",
        help="average-K label sets of images with a trained run: JSON lines, or Parquet parts from a Ray Data job",
        description="Average-K (or top-K) label sets of images with a run's checkpoint and calibrated "
        "thresholds. Local files without --out: one JSON line per image on stdout (path, labels, names, "
        "scores, set_size; an 'error' field for unreadable files). With --out, a bucket prefix or a shard "
        "set: a Ray Data job on the local cluster or RAY_ADDRESS's, a pool of model actors, Parquet parts "
        "in --out (resumable: a rerun skips the parts written with the same checkpoint and K), or JSON "
        "lines (source, ...) without --out. Progress on stderr, a summary line at the end.",
    )
    predict.add_argument("paths", nargs="+", metavar="INPUT",
                         help="image files or folders (searched recursively), a bucket prefix (s3://bucket/prefix), "
                              "or a shard set (a folder or prefix holding manifest.json)")
    predict.add_argument("--run", metavar="RUN_DIR", required=True, help="the training's run directory")
    predict.add_argument("--k", type=float, default=None, help="a calibrated K (see the run's thresholds.json)")
    predict.add_argument("--top-k", action="store_true", help="the K best labels instead (integer K)")
    predict.add_argument("--rule", metavar="NAME", help="instead of K: a calibrated set rule (eval.set_rules)")
    predict.add_argument("--coverage", type=float, metavar="C", help="with --rule: a calibrated coverage target")
    predict.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per forward pass")
    predict.add_argument("--out", metavar="DIR", default=None,
                         help="a folder or bucket prefix for Parquet parts, written by a Ray Data job on the local "
                              "cluster or RAY_ADDRESS's; rerun to resume (without it: JSON lines on stdout)")
    predict.add_argument("--split", default="test", help="a shard set's split to label (default: test)")
    predict.add_argument("--parts", type=int, default=None, metavar="N",
                         help="parts of the output, each input in one by a hash of its key (default 64; kept by reruns)")
    predict.add_argument("--num-actors", type=int, default=None, metavar="N",
                         help="model actors (default: one per GPU, else half the cluster's CPUs)")
    _add_checkpoint_arg(predict)
    predict.set_defaults(func=cmd_predict)
    serve_help = ("serve a run's label sets over HTTP with Ray Serve: the MLflow model's JSON request and answer, "
                  "requests batched together, replicas; until Ctrl-C")
    serve_cmd = sub.add_parser("serve", help=serve_help, description=serve_help)
    serve_cmd.add_argument("--run", metavar="RUN_DIR", required=True, help="the training's run directory")
    serve_cmd.add_argument("--replicas", type=int, default=1, metavar="N", help="model replicas (one CPU each)")
    serve_cmd.add_argument("--max-batch-size", type=int, default=32, metavar="N",
                           help="images of concurrent requests scored as one batch, at most")
    serve_cmd.add_argument("--batch-wait-ms", type=float, default=10.0, metavar="MS",
                           help="how long a batch waits for more images (default 10)")
    serve_cmd.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: loopback only)")
    serve_cmd.add_argument("--port", type=int, default=8000, help="the HTTP port (0: a free one; default 8000)")
    _add_checkpoint_arg(serve_cmd)
    serve_cmd.set_defaults(func=cmd_serve, overrides=[])
    report = sub.add_parser(
        "report",
        help="compare runs: markdown table (report.md) and overlaid figures",
        description="A markdown table per K and run (avg-K, macro avg-K, top-K, set size, oracle), printed "
        "and written to OUT/report.md, with the overlaid figures as PNG in OUT.",
    )
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.json")
    report.add_argument("--out", metavar="DIR", default="report", help="output folder (default: ./report)")
    report.set_defaults(func=cmd_report)
    tune_help = ("hyper-parameter sweep on Ray Tune: one TorchTrainer per trial, ASHA on val avg-K, an MLflow "
                 "parent run with a child per trial, the best trial evaluated on test; rerun to resume")
    tune = sub.add_parser("tune", help=tune_help, description=tune_help)
    tune.add_argument("config", metavar="SWEEP_CONFIG", help="sweep YAML, e.g. configs/sweeps/smoke.yaml")
    tune.add_argument("overrides", nargs="*",
                      help="key=value: config keys (train.epochs=3, data.shards=...) change the base config, "
                           "the others the sweep (num_samples=2, scheduler.name=fifo)")
    tune.set_defaults(func=cmd_tune)
    study_help = ("reproduction study on the synthetic data: methods x ambiguity rates x seeds as Ray tasks, "
                  "an MLflow parent run with a child per cell, summary tables and figures; rerun to resume")
    study = sub.add_parser("study", help=study_help, description=study_help)
    study.add_argument("config", metavar="STUDY_CONFIG", help="study YAML, e.g. configs/studies/synthetic.yaml")
    study.add_argument("overrides", nargs="*",
                       help="key=value: config keys (train.epochs=3) change the base config, the others the study "
                            "(seeds=[0], max_concurrent=1)")
    study.set_defaults(func=cmd_study)
    pipeline_help = ("run a pipeline spec (configs/pipelines/*.yaml): its stages as avgk verbs on Ray, finished ones "
                     "reused, an MLflow parent run with a child per stage and cell; rerun to resume")
    pipeline = sub.add_parser("pipeline", help=pipeline_help, description=pipeline_help)
    pipeline.add_argument("config", metavar="SPEC", help="pipeline YAML, e.g. configs/pipelines/demo.yaml")
    pipeline.add_argument("overrides", nargs="*",
                          help="key=value: config keys (train.epochs=1) change every stage's config, the others the "
                               "spec (max_concurrent=1, stages.train.matrix.seed.values=[0])")
    pipeline.add_argument("--dry-run", action="store_true", help="print each stage's state (done, to run and why); run nothing")
    pipeline.add_argument("--only", metavar="STAGE", default=None, help="run this stage alone (its inputs must be done)")
    pipeline.add_argument("--from", dest="start", metavar="STAGE", default=None,
                          help="run this stage and every stage after it (finished cells are still reused)")
    pipeline.add_argument("--export", choices=["argo"], default=None,
                          help="write the graph as an Argo Workflow to stdout, each stage a KubeRay RayJob running "
                               "`avgk pipeline SPEC --only STAGE`; run nothing")
    pipeline.add_argument("--rayjob-template", metavar="YAML", default="infra/kuberay/rayjob.yaml",
                          help="with --export argo: the RayJob each stage copies (default: %(default)s)")
    pipeline.set_defaults(func=cmd_pipeline)
    compare_help = ("paired differences between methods over finished runs (paired by train.seed) with 95%% "
                    "intervals: comparison.md, comparison.csv and a figure in --out")
    compare = sub.add_parser("compare", help=compare_help, description=compare_help)
    compare.add_argument("runs", nargs="+", metavar="[LABEL=]RUN_DIR",
                         help="run directories, labelled by method (default label: the run's loss.name)")
    compare.add_argument("--reference", required=True, metavar="LABEL", help="the method differences are taken against")
    compare.add_argument("--out", metavar="DIR", default="comparison", help="output folder (default: ./comparison)")
    compare.add_argument("--k", type=float, default=None, help="K that picks the winner (default: the first run's loss.k)")
    compare.set_defaults(func=cmd_compare, overrides=[])
    register_help = "log a finished run's model (checkpoint, thresholds, class names) to its MLflow run and register it"
    register = sub.add_parser("register", help=register_help, description=register_help)
    register.add_argument("run", metavar="RUN_DIR", help="the training's run directory (tracked in MLflow)")
    register.add_argument("--name", required=True, help="the registered model's name")
    _add_checkpoint_arg(register)
    register.set_defaults(func=cmd_register, overrides=[])
    sync_help = ("deliver the MLflow records a command queued while its tracking server did not answer "
                 "(<run_dir>/tracking_outbox/, and $AVGK_OUTBOX_DIR for runs stored remotely)")
    sync = sub.add_parser("sync", help=sync_help, description=sync_help)
    sync.add_argument("paths", nargs="*", metavar="PATH",
                      help="run directories or folders of runs (a pipeline's, a sweep's; searched for outboxes); "
                           "default: $AVGK_OUTBOX_DIR (~/.cache/avgk/tracking_outbox)")
    sync.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                      help="keep trying that long while the server does not answer (default: one try)")
    sync.set_defaults(func=cmd_sync, overrides=[])
    config_help = "print the resolved config a run would use (YAML) and exit; --keys: every key, its type and default"
    config = sub.add_parser("config", help=config_help, description=config_help)
    _add_config_args(config, optional=True)
    config.add_argument("--keys", action="store_true", help="list every config key with type, default and description")
    config.set_defaults(func=cmd_config)
    demo = sub.add_parser(
        "demo",
        help="the embedded default end to end: synthetic data, two-head vs CE on Ray, MLflow",
        description="Synthetic data -> shards -> Ray Train (two-head and CE) -> test evaluation -> comparison table.",
    )
    demo.add_argument("overrides", nargs="*", help="key.sub=value overrides of the embedded defaults")
    demo.set_defaults(func=cmd_demo, config=None)
    return parser


ONE_LINE_ERRORS = (ConfigError, ValueError, FileNotFoundError, FloatingPointError, StorageError, OutageError, DiskFullError)
"""The errors a user can fix: told in one line (`avgk: error: ...`, exit 2), without a traceback."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse stops collecting positionals at the first option, so overrides may also
        # follow one: `avgk evaluate CONFIG --run DIR train.use_gpu=true`.
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.verbose:
        os.environ[console.VERBOSE_ENV] = "1"
    else:  # MLflow announces the creation of a local store's tables at INFO
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
    # SIGTERM (a scheduler, `kill`, a container stop) unwinds like Ctrl-C: the MLflow run ends
    # KILLED, Ray is shut down and temporary folders are removed, instead of a silent exit.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    try:
        with guardian.watching():  # what a kill -9 of this command would leave: its watcher ends it
            code: int = args.func(args)
            return code
    except Terminated:
        print("avgk: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # `avgk config --keys | head`: the reader left; no traceback, no flush error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        if cli_support.terminated:  # SIGTERM, re-raised by a library as a plain KeyboardInterrupt
            print("avgk: terminated", file=sys.stderr)
            return 143
        print("avgk: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line for the errors a user can fix
        cause = root_cause(err)
        if isinstance(cause, ONE_LINE_ERRORS):
            print(f"avgk: error: {one_line(cause)}", file=sys.stderr)
            return 2
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
