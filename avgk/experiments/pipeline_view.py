"""A pipeline's graph for a person: a text tree for the console, a figure for the pipeline folder and MLflow.

Pure functions of the plan and the cells' states; no Ray.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

from avgk.experiments import pipeline_state as ps
from avgk.experiments.pipeline_plan import Cell, Plan


def tree_lines(plan: Plan, states: dict[str, ps.State], prints: dict[str, dict[str, Any]],
               seconds: dict[str, float] | None = None, selected: set[str] | None = None) -> list[str]:
    seconds = seconds or {}
    lines = [f"pipeline {plan.spec.name} -> {plan.root}"]
    for name in plan.stage_order:
        stage = plan.spec.stages[name]
        needs = f" <- {', '.join(stage.needs)}" if stage.needs else ""
        off = "" if selected is None or name in selected else "  [not selected]"
        lines.append(f"  {name} ({stage.verb}){needs}{off}")
        for cell in plan.of_stage(name):
            took = f", {seconds[cell.id]:.0f} s" if cell.id in seconds else ""
            label = cell.name if cell.labels else "-"
            lines.append(f"    {label:<24} {states[cell.id].describe():<34} {prints[cell.id]['fingerprint']}{took}")
    return lines


COLORS = {ps.DONE: "#9ecf8f", ps.RUN: "#f4d58d", ps.RESUME: "#f6b26b", ps.UNREACHABLE: "#cccccc", "failed": "#e06666"}


def graph_figure(plan: Plan, states: dict[str, ps.State], seconds: dict[str, float], failed: list[str]) -> Figure:
    """Stages left to right by depth, one box per cell coloured by state, with its duration; arrows for needs."""
    depth: dict[str, int] = {}
    for name in plan.stage_order:
        needs = plan.spec.stages[name].needs
        depth[name] = 1 + max((depth[n] for n in needs), default=-1)
    columns: dict[int, list[Cell]] = {}
    for name in plan.stage_order:
        columns.setdefault(depth[name], []).extend(plan.of_stage(name))
    rows = max(len(v) for v in columns.values())
    fig = Figure(figsize=(2.6 * len(columns) + 1, 0.75 * rows + 1.2))
    ax = fig.add_subplot()
    where: dict[str, tuple[float, float]] = {}
    for col, cells in columns.items():
        for i, cell in enumerate(cells):
            x, y = col * 2.6, (rows - 1) / 2 - i + (len(cells) - 1) / 2 - (rows - 1) / 2
            where[cell.id] = (x, y)
            state = "failed" if cell.id in failed else states[cell.id].state
            ax.add_patch(FancyBboxPatch((x - 1.0, y - 0.28), 2.0, 0.56, boxstyle="round,pad=0.02",
                                        facecolor=COLORS.get(state, "#ffffff"), edgecolor="#555555"))
            took = f"\n{states[cell.id].why}, {seconds[cell.id]:.0f} s" if cell.id in seconds else ""
            ax.text(x, y, f"{cell.id}{took}", ha="center", va="center", fontsize=7)
    for cell in plan.cells.values():
        for source in cell.inputs:
            (x0, y0), (x1, y1) = where[source], where[cell.id]
            ax.annotate("", xy=(x1 - 1.0, y1), xytext=(x0 + 1.0, y0),
                        arrowprops={"arrowstyle": "->", "color": "#777777", "lw": 0.8})
    ax.set_xlim(-1.2, 2.6 * (len(columns) - 1) + 1.2)
    ax.set_ylim(-rows / 2 - 0.2, rows / 2 + 0.2)
    ax.axis("off")
    ax.set_title(f"pipeline {plan.spec.name}: green done, yellow to run, orange to resume, red failed", fontsize=9)
    fig.tight_layout()
    return fig
