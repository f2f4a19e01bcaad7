"""Several tasks, one model: each task through :func:`eval.runner.run_task` into its own folder, then a summary.

``run_tasks(generator, {name: (task, cfg)}, out_dir)`` writes ``out_dir/NAME/`` per task (predictions,
protocol, metrics, table; each resumable as a single run) and, on rank 0, ``out_dir/results.json`` and
``out_dir/results.md``: per task its headline metric (the first its ``aggregate`` returns, recorded as
``main_metric``), the sample count and the reasoning chains counted. The generator is built once by the
caller; the tasks run one after another in the order given.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.atomic import atomic_write
from eval.runner import Dist, EvalConfig, Generator, fmt_value, run_task
from eval.tasks.base import Task

SUMMARY = "results.json"
SUMMARY_FIELDS = ("n", "n_chain", "n_unterminated", "skipped")  # copied from each task's metrics beside its headline


def run_tasks(
    generator: Generator, tasks: Mapping[str, tuple[Task, EvalConfig]], out_dir: str | Path, resume: bool = False,
    dist: Dist | None = None, progress: bool = True, skip_bad: bool = False,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``generator`` on every task, each with its runner settings, into ``out_dir/NAME``; write the
    summary (``results.json``, ``results.md``). Returns ``{name: metrics}`` on rank 0 (``{}`` elsewhere).
    ``skip_bad``: each task skips and records its samples whose image is missing or unreadable."""
    dist = dist if dist is not None else Dist.from_accelerate()
    out_dir = Path(out_dir)
    metrics = {name: run_task(generator, task, cfg, out_dir / name, resume=resume, dist=dist, progress=progress,
                              skip_bad=skip_bad)
               for name, (task, cfg) in tasks.items()}
    if not dist.is_main:
        return {}
    summary = summarise(metrics)
    atomic_write(out_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    atomic_write(out_dir / "results.md", summary_table(summary))
    print(summary_table(summary))
    return metrics


def summarise(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{"tasks": {name: {"metric", "value", "n", "n_chain", "n_unterminated", "skipped", "dir"}}}`` from each
    task's metrics (as :func:`eval.runner.gather` returns them)."""
    rows = {}
    for name, m in metrics.items():
        key = m["main_metric"]
        rows[name] = {"metric": key, "value": m[key], **{k: m[k] for k in SUMMARY_FIELDS}, "dir": name}
    return {"tasks": rows}


def summary_table(summary: Mapping[str, Any]) -> str:
    """Markdown: one row per task with its headline metric."""
    lines = ["## summary", "", "| task | metric | value | n | chains | unterminated | skipped |",
             "|---|---|---|---|---|---|---|"]
    for name, row in summary["tasks"].items():
        lines.append(f"| {name} | {row['metric']} | {fmt_value(row['value'])} | {row['n']} | {row['n_chain']} "
                     f"| {row['n_unterminated']} | {row['skipped']} |")
    return "\n".join(lines) + "\n"
