"""`avgk compare` and `avgk register`: the verbs that close a comparison (no Ray).

    avgk compare ce=runs/ce-s0 ce=runs/ce-s1 two_head=runs/th-s0 two_head=runs/th-s1 --reference ce
    avgk register runs/th-s0 --name plantnet-avgk

compare pairs runs by their seed (train.seed of each run's config.yaml) and writes comparison.md,
comparison.csv and differences_avg_k.png into --out (and val_curves.png, with each run's best
epoch in the table, when the runs wrote history.json); register logs the run's model (checkpoint,
thresholds, class names) as a pyfunc model in the run's MLflow run and registers it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from avgk.experiments.compare import RunEntry, markdown, plot_differences, plot_val_curves, rows_of, winner
from avgk.experiments.summary import format_summary
from avgk.runtime import storage


@dataclass(frozen=True)
class Comparison:
    out: str
    winner: str
    winner_run: str  # the winner's run with the best test avg-K at k
    table: str
    per_run: str  # format_summary's table of every run (the demo's; one seed reads best this way)


def parse_runs(items: Sequence[str]) -> list[tuple[str, str]]:
    """LABEL=RUN_DIR arguments as (label, run_dir); a bare RUN_DIR is labelled by its loss.name."""
    out = []
    for item in items:
        label, sep, run_dir = item.partition("=")
        if not sep:
            label, run_dir = "", item
        if not storage.exists(storage.join(run_dir, "metrics.json")):
            raise FileNotFoundError(f"{run_dir}: no metrics.json (a finished run directory is needed)")
        if not label:
            loss = _run_config(run_dir)["loss"]
            label = str(loss["name"]) if isinstance(loss, dict) else "run"
        out.append((label, run_dir))
    if len({label for label, _ in out}) < 2:
        raise ValueError(f"compare needs runs of at least two methods, got {sorted({label for label, _ in out})}")
    return out


def _run_config(run_dir: str) -> dict[str, object]:
    path = storage.join(run_dir, "config.yaml")
    if not storage.exists(path):
        raise FileNotFoundError(f"{run_dir}: no config.yaml (a run directory written by avgk train is needed)")
    tree: dict[str, object] = yaml.safe_load(storage.read_bytes(path))
    return tree


def entries_of(runs: Sequence[tuple[str, str]]) -> list[RunEntry]:
    entries = []
    for label, run_dir in runs:
        train = _run_config(run_dir)["train"]
        seed = int(train["seed"]) if isinstance(train, dict) else 0
        try:
            metrics = json.loads(storage.read_bytes(storage.join(run_dir, "metrics.json")))
        except json.JSONDecodeError as err:
            raise ValueError(f"{run_dir}/metrics.json is not valid JSON ({err})") from None
        history_file = storage.join(run_dir, "history.json")  # written by avgk's training since the pipeline studies
        history = storage.read_json(history_file) if storage.exists(history_file) else []
        entries.append(RunEntry(method=label, seed=seed, run_dir=run_dir, metrics=metrics, history=history))
    return entries


def run_compare(runs: Sequence[tuple[str, str]], *, reference: str, out: str, k: float | None = None,
                log: Callable[[str], None] = print) -> Comparison:
    from avgk.experiments.report import save_figure

    entries = entries_of(runs)
    rows = rows_of(entries)
    ks = [str(x) for x in entries[0].metrics["ks"]]
    ks = [k_.removesuffix(".0") for k_ in ks]
    if k is None:
        loss = _run_config(runs[0][1])["loss"]
        k = float(loss["k"]) if isinstance(loss, dict) else float(ks[0])
    text = markdown(rows, reference=reference, ks=ks)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "comparison.md").write_text("# Comparison\n\n" + text)
    rows.to_csv(Path(out) / "comparison.csv", index=False)
    save_figure(plot_differences(rows, reference=reference, ks=ks), Path(out) / "differences_avg_k.png")
    curves = plot_val_curves(entries)
    if curves is not None:
        save_figure(curves, Path(out) / "val_curves.png")
    best = winner(rows, reference=reference, k=k)
    column = f"avg_k_accuracy@{str(k).removesuffix('.0')}"
    mine = rows[rows["method"] == best]
    best_run = str(mine.loc[mine[column].idxmax(), "run_dir"]) if column in rows else str(mine["run_dir"].iloc[0])
    log(f"comparison of {len(entries)} runs: best mean test avg-{str(k).removesuffix('.0')}: {best} ({best_run}); "
        f"{out}/comparison.md")
    per_run = format_summary({f"{e.method}-s{e.seed}" if rows["seed"].nunique() > 1 else e.method: e.metrics
                              for e in entries})
    return Comparison(out=out, winner=best, winner_run=best_run, table=text, per_run=per_run)


def run_register(run_dir: str, *, name: str, checkpoint: str | None = None, log: Callable[[str], None] = print) -> str:
    """The run's model logged in its MLflow run and registered as `name` (a new version); the model URI."""
    from avgk.config import Config
    from avgk.inference.serving import log_pyfunc_model
    from avgk.records import tracking
    from avgk.records.runs import resolve_checkpoint

    config = Config.model_validate(_run_config(run_dir))
    id_file = storage.join(run_dir, tracking.RUN_ID_FILE)
    if not config.tracking.enabled or not storage.exists(id_file):
        raise ValueError(f"{run_dir} has no MLflow run ({tracking.RUN_ID_FILE}): register needs a tracked run "
                         "(tracking.enabled=true when it trained)")
    uri = tracking.tracking_uri(config)
    run_id = storage.read_bytes(id_file).decode().strip()
    model_uri = log_pyfunc_model(uri, run_id, run_dir,
                                 checkpoint=resolve_checkpoint(run_dir, checkpoint, default=config.eval.checkpoint),
                                 register_as=name)
    log(f"registered {run_dir} as {name}: {model_uri}")
    return model_uri
