"""`fedcl report RUN_DIR`: one self-contained page (``report.html``) about one run.

In order: the run's status and config; its summary metrics; the task-end accuracy matrix; the
accuracy on each task over rounds with the run's events marked, and the events listed; the
per-client spread (recorded under drift); the per-round system figures. Figures are PNGs
embedded as base64, so the page needs no other file. An interrupted run (no summary.json) gets
the same page for the rounds it recorded, saying so, with its metrics computed from them.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedcl.metrics.continual import continual_summary, stream_summary
from fedcl.reports import figures
from fedcl.reports.runfolder import RunFolder, read_run, scalar_metrics
from fedcl.reports.text import fmt, show

REPORT = "report.html"
MAX_EVENT_ROWS = 200
MAX_LISTED = 12  # clients listed per event before "and N more"

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
.warn { background: #fff3cd; border: 1px solid #e0c36c; padding: 0.6em 1em; }
.fail { background: #f8d7da; border: 1px solid #d88; padding: 0.6em 1em; }
.note { color: #666; font-size: 0.9em; }
"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` into the run folder `run_dir` and return its path.

    Raises a one-line `FedclError` when `run_dir` is not a run folder (or is a multi-seed
    parent). An interrupted run gets a page of the rounds it recorded, saying it was interrupted.
    """
    run = read_run(run_dir)
    path = run.path / REPORT
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render(run), encoding="utf-8")
    tmp.replace(path)
    return path


def render(run: RunFolder) -> str:
    """The report page of `run` as one HTML string."""
    name = str(run.config.get("name") or run.path.name)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>fedcl report: {_e(name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>fedcl run report: {_e(name)}</h1>",
        _status(run),
        "<h2>Config</h2>",
        f"<details open><summary>config.yaml</summary><pre>{_e(run.config_text)}</pre></details>",
        "<h2>Summary metrics</h2>",
        _summary_table(run),
        "<h2>Accuracy matrix</h2>",
        _matrix(run),
        "<h2>Accuracy on each task over rounds</h2>",
        _task_accuracy(run),
        "<h2>Per-client spread</h2>",
        _client_spread(run),
        "<h2>System figures</h2>",
        _system(run),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _e(text: Any) -> str:
    return html.escape(str(text))


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></p>'


def _rounds(run: RunFolder) -> list[int]:
    return [int(r.get("round", i + 1)) for i, r in enumerate(run.records)]


def _status(run: RunFolder) -> str:
    rounds = _rounds(run)
    planned = run.config.get("rounds")
    done = f"rounds {rounds[0]}–{rounds[-1]}" if rounds else "no round"
    facts = [
        ("folder", str(run.path)),
        ("strategy", run.strategy or "-"),
        ("seed", show(run.config.get("seed"))),
        ("rounds recorded", f"{len(rounds)} of {show(planned)}"),
        ("events", str(len(run.events))),
    ]
    table = "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    table += "</table>"
    if rounds:
        covered = f"the {len(rounds)} round(s) recorded ({done} of {_e(show(planned))})"
    else:
        covered = f"no round: none of the {_e(show(planned))} was recorded"
    if run.interrupted:
        banner = (
            f'<p class="warn"><b>Interrupted run:</b> no summary.json, so the run stopped before '
            f"its end; this report covers {covered}. Continue it with <code>fedcl run --resume "
            f"{_e(run.path)}</code>.</p>"
        )
    elif run.summary.get("status") != "completed":
        banner = (
            f'<p class="fail"><b>Run {_e(run.summary.get("status", "failed"))}:</b> '
            f"{_e(run.summary.get('error', 'see summary.json'))}</p>"
        )
    else:
        banner = f"<p>Completed: {done}.</p>"
    return banner + table


def _sequential(run: RunFolder) -> bool:
    """Whether the task-end matrix is defined: the summary says so, or (interrupted) the config
    has global boundaries and no custom stream."""
    if run.summary is not None and "accuracy_matrix" in run.summary:
        return isinstance(run.summary["accuracy_matrix"], list)
    scenario = run.config.get("scenario") or {}
    return scenario.get("boundaries", "global") == "global" and scenario.get("stream") is None


def _partial_summary(run: RunFolder) -> tuple[dict[str, Any], str]:
    """The metrics of the rounds a run recorded (one interrupted, or failed before its summary
    had any), and a note on how they came."""
    if not any(r.get("acc") for r in run.records):
        return {}, "No round was evaluated, so there are no metrics."
    try:
        if _sequential(run):
            values = continual_summary(run.records, run.num_tasks)
        else:
            values = stream_summary(run.records)
    except (ValueError, TypeError, KeyError) as exc:
        return {}, f"The metrics could not be computed from the recorded rounds: {exc}"
    note = f"Computed from the {len(run.records)} round(s) recorded, not from a final summary."
    return values, note


def _summary_table(run: RunFolder) -> str:
    if run.summary is None or not scalar_metrics(run.summary):  # interrupted, or failed early
        summary, note = _partial_summary(run)
        summary = {**(run.summary or {}), **summary}
    else:
        summary, note = run.summary, ""
    metrics = scalar_metrics(summary)
    texts = {
        k: v for k, v in summary.items() if isinstance(v, str) and k not in ("status", "error")
    }
    rows = "".join(
        f'<tr><th>{_e(k)}</th><td class="num">{_e(fmt(v))}</td></tr>' for k, v in metrics.items()
    )
    rows += "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in texts.items())
    nulls = sorted(k for k, v in summary.items() if v is None)
    out = f'<p class="note">{_e(note)}</p>' if note else ""
    out += f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>" if rows else ""
    if nulls:
        out += f'<p class="note">Undefined for this run (null): {_e(", ".join(nulls))}.</p>'
    return out or '<p class="note">No metrics.</p>'


def _matrix(run: RunFolder) -> str:
    if not _sequential(run):
        return (
            '<p class="note">The task-end accuracy matrix is undefined for this stream (tasks '
            "switch per client or recur); see the accuracy over rounds below.</p>"
        )
    try:
        png = figures.matrix_figure(run.records, run.num_tasks)
    except ValueError as exc:
        return f'<p class="note">No accuracy matrix: {_e(exc)}</p>'
    return _img(png, "task-end accuracy matrix R[i, j]")


def _task_accuracy(run: RunFolder) -> str:
    if not any(r.get("acc") for r in run.records):
        return '<p class="note">No round was evaluated.</p>'
    clients = (run.config.get("clients") or {}).get("num")
    png = figures.task_accuracy_figure(
        run.records,
        run.events,
        run.num_tasks,
        num_clients=clients if isinstance(clients, int) else None,
    )
    return _img(png, "accuracy on each task over rounds, with events") + _events_table(run.events)


def _clients(clients: Any) -> str:
    if not isinstance(clients, list):
        return show(clients)
    listed = ", ".join(str(c) for c in clients[:MAX_LISTED])
    more = f" and {len(clients) - MAX_LISTED} more" if len(clients) > MAX_LISTED else ""
    return f"{len(clients)}: {listed}{more}"


def _details(event: Mapping[str, Any]) -> str:
    skip = {"round", "kind", "clients", "deleted", "ids_file"}
    return ", ".join(f"{k}={show(v)}" for k, v in event.items() if k not in skip)


def _events_table(events: Sequence[Mapping[str, Any]]) -> str:
    if not events:
        return '<p class="note">No events were applied in this run.</p>'
    counts: dict[str, int] = {}
    for event in events:
        counts[str(event.get("kind"))] = counts.get(str(event.get("kind")), 0) + 1
    head = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    rows = "".join(
        f"<tr><td class='num'>{_e(ev.get('round'))}</td><td>{_e(ev.get('kind'))}</td>"
        f"<td>{_e(_clients(ev.get('clients')))}</td><td>{_e(_details(ev))}</td></tr>"
        for ev in events[:MAX_EVENT_ROWS]
    )
    more = len(events) - MAX_EVENT_ROWS
    tail = f'<p class="note">… and {more} more in events.jsonl.</p>' if more > 0 else ""
    return (
        f"<p>Events applied (events.jsonl): {_e(head)}.</p>"
        "<table><tr><th>round</th><th>kind</th><th>clients</th><th>parameters</th></tr>"
        f"{rows}</table>{tail}"
    )


def _client_spread(run: RunFolder) -> str:
    png = figures.client_spread_figure(run.records)
    if png is None:
        return (
            '<p class="note">This run records no per-client accuracy (metrics.jsonl has '
            "<code>client_acc</code> only while clients hold different concepts, under drift)."
            "</p>"
        )
    return _img(png, "per-client accuracy over rounds")


def _system(run: RunFolder) -> str:
    png, left_out = figures.system_figure(run.records)
    if png is None:
        return '<p class="note">No per-round figures recorded.</p>'
    note = ""
    if left_out:
        note = f'<p class="note">Not drawn (in metrics.jsonl): {_e(", ".join(left_out))}.</p>'
    return _img(png, "per-round system figures") + note
