"""Results a researcher can show: several seeds in one command, runs side by side, one-page reports.

- `runfolder`: read a run folder (config, summary, per-round records, events) or a multi-seed
  parent folder, and the scalar metrics of a summary;
- `seeds`: `run_seeds`, one run per seed under a parent folder, and the aggregate (mean, std, n)
  of their summaries (``fedcl run CONFIG --seeds 0 1 2``);
- `compare`: runs or multi-seed parents side by side as a table (Markdown, CSV) and a plot of
  average accuracy over rounds (``fedcl compare``);
- `figures`: the PNG figures of compare and report;
- `html_report`: one self-contained ``report.html`` per run folder (``fedcl report``);
- `text`: how numbers and values are written in tables; `cli`: the three commands' arguments
  and messages.

Nothing here imports Ray or torch at import time; only `run_seeds` runs simulations.
"""
