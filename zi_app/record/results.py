"""A sweep's results read back from MLflow: one row per job, the best run, the job tables and the
throughput plot, and where to browse them in the MLflow UI.

Reading and formatting only: the runs are opened and closed by the app and the sweep callback (hydra_plugins/zero_inference/sweep_callback.py).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from zi_app.record import runs, store
from zi_app.config.paths import command
from zi_app.record.redaction import public_url

METRIC = "tokens_per_sec"
PREDICTED = "predicted_tokens_per_sec"  # the planner's prediction of METRIC, logged before loading
GPU_ALLOCATED = "peak_gpu_allocated_bytes"
GPU_RESERVED = "peak_gpu_reserved_bytes"  # what the card must hold: the metric a GPU memory cap applies to
HOST_RSS = "peak_host_rss_bytes"
GIB = 2**30
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
# An experiment tag with this prefix is a saved view of the MLflow UI's runs table (what its Share button writes),
# opened by ?viewStateShareKey=<rest of the tag's key>. The URL's query can set the filter and the order
# (searchFilter, orderByKey, orderByAsc) but not the columns; a saved view sets all three.
VIEW_STATE_TAG = "mlflow.sharedViewState."
# What a person compares jobs by: memory in GiB (runs.in_gib), and why a job failed (zi.failure_kind).
VIEW_COLUMNS = (f"metrics.`{METRIC}`", "metrics.`decode_step_s`", "metrics.`peak_gpu_reserved_gib`",
                "metrics.`peak_host_rss_gib`", f"tags.`{runs.FAILURE_KIND_TAG}`")
# Metrics shown in tables, in this order, when any run has them: (header, divisor, format).
COLUMNS = {
    METRIC: ("tokens/s", 1, "{:.2f}"),
    PREDICTED: ("predicted tokens/s", 1, "{:.2f}"),
    "latency_s": ("latency s", 1, "{:.3f}"),
    "decode_step_s": ("decode step s", 1, "{:.4f}"),
    "streamed_bytes_per_step": ("streamed GB/step", 1e9, "{:.2f}"),
    "roofline_ratio": ("step/roofline", 1, "{:.2f}"),
    GPU_ALLOCATED: ("peak GPU alloc GiB", GIB, "{:.2f}"),
    GPU_RESERVED: ("peak GPU reserved GiB", GIB, "{:.2f}"),
    HOST_RSS: ("peak host GiB", GIB, "{:.2f}"),
}


@dataclass
class JobRow:
    """One job of a sweep as MLflow recorded it."""

    run_id: str
    experiment_id: str
    overrides: str
    status: str
    failure_kind: str
    failure_message: str
    metrics: Dict[str, float]
    artifact_uri: str
    start_time: int

    @classmethod
    def from_run(cls, run) -> "JobRow":
        tags = run.data.tags
        return cls(run_id=run.info.run_id, experiment_id=run.info.experiment_id,
                   overrides=tags.get(runs.OVERRIDES_TAG, ""), status=run.info.status,
                   failure_kind=tags.get(runs.FAILURE_KIND_TAG, ""),
                   failure_message=tags.get(runs.FAILURE_MESSAGE_TAG, ""), metrics=dict(run.data.metrics),
                   artifact_uri=run.info.artifact_uri, start_time=run.info.start_time or 0)

    @property
    def completed(self) -> bool:
        return self.status == "FINISHED"

    def values(self) -> Dict[str, str]:
        """The job's overrides as {key: value} (``+``/``++`` prefixes dropped)."""
        pairs = (item.split("=", 1) for item in self.overrides.split() if "=" in item)
        return {key.lstrip("+~"): value for key, value in pairs}

    def label(self, keys: Sequence[str]) -> str:
        """The job's values of ``keys`` (the swept ones), or all its overrides when there are none."""
        values = self.values()
        return " ".join(f"{key}={values[key]}" for key in keys if key in values) or self.overrides or "(none)"

    def outcome(self) -> str:
        return "FINISHED" if self.completed else f"{self.status} {self.failure_kind}".strip()


def child_rows(client, parent_run_id: str) -> List[JobRow]:
    """The jobs of the sweep whose parent run is ``parent_run_id``, in start order."""
    parent = client.get_run(parent_run_id)
    children = store.search_runs(client, [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return sorted((JobRow.from_run(run) for run in children), key=lambda row: row.start_time)


def experiment_rows(client, experiment_ids: Sequence[str]) -> List[JobRow]:
    """Every job run of the experiments (sweep parent runs left out), in start order."""
    jobs = [run for run in store.search_runs(client, list(experiment_ids), "")
            if run.data.tags.get(runs.ROLE_TAG) != "sweep"]
    return sorted((JobRow.from_run(run) for run in jobs), key=lambda row: row.start_time)


def rank(rows: Sequence[JobRow], metric: str = METRIC, minimize: bool = False,
         max_gpu_gib: Optional[float] = None, max_host_gib: Optional[float] = None) -> List[JobRow]:
    """Completed runs that have ``metric`` and stay within the memory caps, best first.

    A GPU cap applies to peak reserved GPU memory (what the card must hold); a run without that
    metric (a CPU run) does not meet a GPU cap.
    """
    def within(row: JobRow, key: str, cap: Optional[float]) -> bool:
        return cap is None or (key in row.metrics and row.metrics[key] <= cap * GIB)

    eligible = [row for row in rows if row.completed and metric in row.metrics
                and within(row, GPU_RESERVED, max_gpu_gib) and within(row, HOST_RSS, max_host_gib)]
    return sorted(eligible, key=lambda row: row.metrics[metric], reverse=not minimize)


def best(rows: Sequence[JobRow], metric: str = METRIC) -> Optional[JobRow]:
    """The completed run with the highest ``metric``, or None."""
    ranked = rank(rows, metric)
    return ranked[0] if ranked else None


def swept_keys(rows: Sequence[JobRow]) -> List[str]:
    """The override keys whose value differs between jobs, in the order they first appear."""
    seen: Dict[str, set] = {}
    for row in rows:
        for key, value in row.values().items():
            seen.setdefault(key, set()).add(value)
    return [key for key, values in seen.items() if len(values) > 1]


def display_order(rows: Sequence[JobRow], metric: str = METRIC) -> List[JobRow]:
    """Completed runs by ``metric``, highest first, then the failed ones in start order."""
    done = sorted((r for r in rows if r.completed), key=lambda r: r.metrics.get(metric, -math.inf), reverse=True)
    return done + [r for r in rows if not r.completed]


def common_overrides(rows: Sequence[JobRow]) -> str:
    """The overrides every job shares (the swept keys left out)."""
    swept = set(swept_keys(rows))
    first = rows[0].values() if rows else {}
    return " ".join(f"{key}={value}" for key, value in first.items()
                    if key not in swept and all(row.values().get(key) == value for row in rows))


def _table(rows: Sequence[JobRow], top: Optional[JobRow]) -> tuple:
    metrics = [key for key in COLUMNS if any(key in row.metrics for row in rows)]
    keys = swept_keys(rows)
    header = ["", " ".join(keys) or "overrides", "status"] + [COLUMNS[key][0] for key in metrics]
    body = []
    for row in display_order(rows):
        mark = "best" if top is not None and row.run_id == top.run_id else ("FAILED" if not row.completed else "")
        cells = [COLUMNS[key][2].format(row.metrics[key] / COLUMNS[key][1]) if key in row.metrics else ""
                 for key in metrics]
        body.append([mark, row.label(keys), row.outcome()] + cells)
    return header, body


def console_table(rows: Sequence[JobRow], top: Optional[JobRow]) -> str:
    """The jobs as aligned text, best first, failures last with their messages below the table."""
    header, body = _table(rows, top)
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header] + body]
    lines.insert(1, "  ".join("-" * width for width in widths))
    keys = swept_keys(rows)
    for row in rows:
        if not row.completed:
            message = row.failure_message.splitlines()[0] if row.failure_message else "(no message)"
            lines.append(f"  {row.label(keys)}: {row.failure_kind or row.status}: {message[:200]}")
    return "\n".join(lines)


def markdown_table(rows: Sequence[JobRow], top: Optional[JobRow]) -> str:
    """The jobs as a Markdown table, best first, with each run's id and failure message."""
    header, body = _table(rows, top)
    ordered = display_order(rows)
    header = header + ["run", "failure"]
    body = [line + [row.run_id, row.failure_message.splitlines()[0][:200] if row.failure_message else ""]
            for line, row in zip(body, ordered)]
    escape = lambda cell: cell.replace("|", "\\|")  # noqa: E731
    common = common_overrides(rows)
    lines = [f"Every job: `{common}`", ""] if common else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(escape(cell) for cell in line) + " |" for line in body]
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[JobRow], top: Optional[JobRow]) -> str:
    """Every job with its overrides as columns and every metric, raw, in start order."""
    keys = list(dict.fromkeys(key for row in rows for key in row.values()))
    metrics = sorted({key for row in rows for key in row.metrics})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["run_id", "best", "status", "failure_kind", "failure_message", "overrides", *keys, *metrics])
    for row in rows:
        values = row.values()
        writer.writerow([row.run_id, top is not None and row.run_id == top.run_id, row.status, row.failure_kind,
                         row.failure_message, row.overrides, *(values.get(k, "") for k in keys),
                         *(row.metrics.get(m, "") for m in metrics)])
    return out.getvalue()


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def plot(rows: Sequence[JobRow], metric: str = METRIC):
    """``metric`` against batch (or the first swept key), one line per value of the other swept keys, with
    the planner's predicted tokens/s as a dashed line of the same colour; failed jobs are drawn as crosses
    on the x axis, labelled with their failure kind.

    Returns a matplotlib Figure rendered by the Agg backend (no display, no pyplot state).
    """
    from matplotlib.figure import Figure

    keys = swept_keys(rows)
    x_key = "batch" if "batch" in keys else (keys[0] if keys else None)
    others = [key for key in keys if key != x_key]
    x_text = [row.values().get(x_key, "") if x_key else "" for row in rows]
    numeric = all(_number(x) is not None for x in x_text)
    categories = list(dict.fromkeys(x_text))
    xs = [_number(x) if numeric else float(categories.index(x)) for x in x_text]

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    series: Dict[str, List[int]] = {}
    for i, row in enumerate(rows):
        label = " ".join(f"{key}={row.values().get(key, '')}" for key in others) or metric
        series.setdefault(label, []).append(i)
    failure_labels: Dict[float, set] = {}
    for label, members in series.items():
        done = sorted((xs[i], rows[i].metrics[metric]) for i in members if rows[i].completed and metric in rows[i].metrics)
        line, = ax.plot([x for x, _ in done], [y for _, y in done], marker="o", label=label)
        if metric == METRIC:  # the planner's curve in the same colour, dashed, through every planned job
            predicted = sorted((xs[i], rows[i].metrics[PREDICTED]) for i in members if PREDICTED in rows[i].metrics)
            if predicted:
                ax.plot([x for x, _ in predicted], [y for _, y in predicted], linestyle="--", marker=".",
                        color=line.get_color(), alpha=0.7, label=f"{label} (predicted)")
        for i in members:
            if not rows[i].completed:  # on the axis, in the colour of its line, never clipped
                ax.plot([xs[i]], [0], marker="X", markersize=12, markeredgecolor="firebrick", linestyle="none",
                        color=line.get_color(), clip_on=False, zorder=5)
                failure_labels.setdefault(xs[i], set()).add(rows[i].failure_kind or rows[i].status)
    for x, kinds in failure_labels.items():  # one upright label per x: neighbouring failures do not overlap
        ax.annotate(", ".join(sorted(kinds)), (x, 0), textcoords="offset points", xytext=(0, 10), ha="center",
                    va="bottom", rotation=90, fontsize=8, color="firebrick")
    if numeric and xs and min(xs) > 0 and max(xs) / min(xs) >= 4:
        ax.set_xscale("log", base=2)
    if numeric:
        ax.set_xticks(sorted(set(xs)), [x for _, x in sorted(set(zip(xs, x_text)))])
    else:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_ylim(bottom=0)
    ax.set_xlabel(x_key or "job")
    ax.set_ylabel(metric)
    failed = sum(not row.completed for row in rows)
    ax.set_title(f"{metric} against {x_key or 'job'}" + (f" ({failed} failed: X on the axis)" if failed else ""))
    ax.grid(alpha=0.3)
    ax.legend(title=" ".join(others) or None)
    return fig


def ui_command(uri: str) -> Optional[str]:
    """The command that serves the MLflow UI on a local SQLite store (None for a tracking server), with
    this environment's ``mlflow`` so that it works pasted into any shell."""
    if not uri.startswith(store.SQLITE_PREFIX):
        return None
    return f"{command('mlflow', 'mlflow')} ui --backend-store-uri {store.absolute_uri(uri)} --host 127.0.0.1"


def ui_base(uri: str) -> str:
    """Where the MLflow UI of ``uri`` is: the tracking server itself (credentials left out), else ``mlflow ui``'s
    default address."""
    return public_url(uri).rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS


def view_state(parent_run_id: str, metric: str = METRIC) -> Dict[str, object]:
    """A saved view of the MLflow UI's runs table (stored as the experiment tag ``VIEW_STATE_TAG + key``): the
    sweep's jobs, best first, with the headline figures as columns."""
    return {"searchFilter": f"tags.mlflow.parentRunId = '{parent_run_id}'", "orderByKey": f"metrics.`{metric}`",
            "orderByAsc": False, "selectedColumns": list(VIEW_COLUMNS)}


def view_url(uri: str, experiment_id: str, key: str) -> str:
    """The runs table as the saved view ``key`` describes it, in the model-training view."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs?viewStateShareKey={key}&workflowType=machine_learning"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """A run's page (its metrics, tags and artifacts) in the model-training view, not the GenAI one."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
