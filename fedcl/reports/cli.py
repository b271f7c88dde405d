"""The command-line side of `fedcl run --seeds`, `fedcl compare` and `fedcl report`: arguments
and messages only (the work is in `seeds`, `compare` and `html_report`)."""

from __future__ import annotations

import argparse
import json
import sys

from fedcl.errors import FedclError

# What `fedcl run --seeds` prints and `fedcl compare` shows unless --metrics says otherwise: the
# first of these names that the runs' summaries hold (other scalar metrics are all in the files).
DEFAULT_METRICS = (
    "acc",
    "fgt",
    "bwt",
    "forgetting_max",
    "forgetting",
    "fwt",
    "min_acc",
    "wc_acc",
    "val_acc",
    "rounds",
    "wall_s",
)


def add_seeds_argument(run: argparse.ArgumentParser) -> None:
    """`fedcl run ... --seeds 0 1 2`: one run per seed under a parent folder."""
    run.add_argument(
        "--seeds",
        nargs="+",
        default=None,
        metavar="SEED",
        help="run once per seed, each into OUT/seed_<s>/, and write OUT/summary.json with the "
        "mean, std and n of every scalar metric over the seeds (--out: the parent folder)",
    )


def split_seeds(values: list[str]) -> tuple[list[int], list[str]]:
    """`--seeds 0 1 2 rounds=3` takes the overrides after the seeds too: (seeds, overrides)."""
    seeds, overrides = [], []
    for value in values:
        if "=" in value:
            overrides.append(value)
            continue
        try:
            seeds.append(int(value))
        except ValueError:
            raise FedclError(f"--seeds takes integers, got {value!r}") from None
    if not seeds:
        raise FedclError("--seeds needs at least one seed, e.g. --seeds 0 1 2")
    return seeds, overrides


def run_seeds_from_args(args: argparse.Namespace, progress: bool | None) -> int:
    """`fedcl run CONFIG --seeds ...`: exit 0 when every seed completed, 1 (with one line naming
    the failed seeds and why) when any failed."""
    from fedcl.reports.seeds import run_seeds

    if args.resume is not None:
        raise FedclError(
            "--resume continues one run: give it one seed's folder (PARENT/seed_<s>), "
            "without --seeds"
        )
    if args.config is None:
        raise FedclError("fedcl run --seeds needs an experiment config")
    seeds, more = split_seeds(args.seeds)
    result = run_seeds(
        args.config, *args.overrides, *more, seeds=seeds, out=args.out, progress=progress
    )
    summary = result.summary
    metrics = summary["metrics"]
    shown = {k: _mean_std(metrics[k]) for k in DEFAULT_METRICS if k in metrics}
    print(json.dumps({"seeds": summary["completed"], **shown}))
    print(f"run folders: {result.out_dir} ({', '.join(summary['runs'].values())})")
    if not result.ok:
        print(
            f"fedcl: error: {summary.get('error', 'a seed failed')}; see "
            f"{result.out_dir}/summary.json",
            file=sys.stderr,
        )
        return 1
    return 0


def _mean_std(entry: dict) -> dict:
    return {"mean": entry["mean"], "std": entry["std"], "n": entry["n"]}


def _names(text: str | None) -> list[str] | None:
    """`a,b, c` -> ["a", "b", "c"]; None stays None."""
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def add_compare_arguments(compare: argparse.ArgumentParser) -> None:
    """`fedcl compare RUN_OR_PARENT ... [--out DIR] [--metrics a,b] [--labels x,y]
    [--settings k1,k2]`."""
    compare.add_argument(
        "paths",
        nargs="+",
        metavar="RUN_OR_PARENT",
        help="run folders, or parent folders of `fedcl run --seeds` (shown as mean ± std)",
    )
    compare.add_argument(
        "--out",
        default=None,
        help="folder for compare.md, compare.csv and avg_acc.png (default: runs/compare-<time>)",
    )
    compare.add_argument(
        "--metrics",
        default=None,
        metavar="A,B",
        help="columns: scalar names of summary.json, comma-separated (nested keys dotted, "
        f"e.g. deletion_audit.deleted); default: those of {', '.join(DEFAULT_METRICS)} present",
    )
    compare.add_argument(
        "--labels",
        default=None,
        metavar="X,Y",
        help="one label per run, comma-separated (default: the strategy's name, or the folder's "
        "name when strategies repeat)",
    )
    compare.add_argument(
        "--settings",
        default=None,
        metavar="K1,K2",
        help="config keys to show beside the metrics, read from each run's config.yaml "
        "(dotted, e.g. train.lr,clients.num)",
    )


def compare_from_args(args: argparse.Namespace) -> int:
    """`fedcl compare`: print the Markdown table, write it with the CSV and the plot."""
    from fedcl.reports.compare import compare

    result = compare(
        args.paths,
        args.out,
        metrics=_names(args.metrics),
        labels=_names(args.labels),
        settings=_names(args.settings) or (),
        default_metrics=DEFAULT_METRICS,
    )
    print(result.markdown, end="")
    print(f"wrote {', '.join(str(p) for p in result.files)}")
    return 0


def add_report_arguments(report: argparse.ArgumentParser) -> None:
    """`fedcl report RUN_DIR`."""
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by fedcl run")


def report_from_args(args: argparse.Namespace) -> int:
    """`fedcl report RUN_DIR`: write RUN_DIR/report.html and print its path."""
    from fedcl.reports.html_report import write_report

    path = write_report(args.run_dir)
    print(f"report: {path}")
    return 0
