"""Figures and tables of the paper from finished sweeps, read from MLflow; nothing is retrained.

    python -m analysis fig6 --experiment prunelab-fig6 --tracking-uri sqlite:////abs/runs/fig6/mlflow.db
    python -m analysis all  --experiment prunelab-fig6 --tracking-uri ...

`run()` is the API the sweep driver calls at the end of a sweep.
"""

from __future__ import annotations

import html
import importlib
import os
from typing import Optional

from mlflow import MlflowClient

from prunelab import schema

from .load import load_sweep, missing_runs
from .output import FigureResult
from .report import write_report

FIGURES = ("fig2", "fig3_4", "fig5", "hessian", "spectrum", "fig6", "fig7", "masks", "instability")


def make_figures(sweep, names, out_dir: str, options: Optional[dict] = None) -> list:
    """Run each figure module's `make(sweep, out_dir, **options[name])`; a module that raises is
    reported, not fatal."""
    results = []
    for name in names:
        module = importlib.import_module(f"{__name__}.{name}")
        try:
            results.append(module.make(sweep, out_dir, **(options or {}).get(name, {})))
        except Exception as e:  # noqa: BLE001 - one broken figure must not hide the others
            res = FigureResult(name, name)
            res.missing.append(f"{name}: failed to draw ({type(e).__name__}: {e})")
            results.append(res)
    return results


def run(figure: str, experiment: str, tracking_uri: Optional[str], out_dir: str,
        parent_run_id: Optional[str] = None, log_to_mlflow: bool = True, options: Optional[dict] = None) -> dict:
    """Draw `figure` (one of FIGURES, or 'all') for a sweep; write PNG/SVG/CSV and report.html to
    `out_dir`, log them to the sweep's parent run, and return what was written and what is missing.
    `options`: figure name -> keyword arguments of its `make` (e.g. {"fig6": {"bn_mode": "recompute"}})."""
    if figure != "all" and figure not in FIGURES:
        raise ValueError(f"figure: unknown {figure!r}; use one of {', '.join(FIGURES)} or all")
    names = FIGURES if figure == "all" else (figure,)
    out_dir = os.path.abspath(str(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    sweep = load_sweep(experiment, tracking_uri, parent_run_id)
    general = missing_runs(sweep)
    results = make_figures(sweep, names, out_dir, options)
    config = sweep.download(sweep.parent_id, schema.SWEEP_CONFIG)
    info = {"experiment": experiment, "tracking URI": sweep.tracking_uri, "sweep run": sweep.parent_name,
            "sweep run id": sweep.parent_id, "chains": len(sweep.chains), "failed chains": len(sweep.failed),
            "git commit": sweep.parent_tags.get(schema.GIT_COMMIT_TAG, "?")}
    if config:
        local_config = os.path.join(out_dir, "sweep_config.yaml")
        with open(config) as src, open(local_config, "w") as dst:
            dst.write(src.read())
        config = local_config
    report = write_report(out_dir, info, results, general, config)
    out = {"figures": [p for r in results for p in r.figures], "tables": [p for r in results for p in r.tables],
           "missing": general + [m for r in results for m in r.missing],
           "notes": [n for r in results for n in r.notes], "report": report, "results": results}
    if log_to_mlflow:
        for path in out["figures"] + out["tables"] + [report]:
            sweep.client.log_artifact(sweep.parent_id, path, schema.FIGURES_DIR)
    return out


def sweep_experiments(tracking_uri: Optional[str]) -> list[str]:
    """Names of the experiments at `tracking_uri` that hold at least one sweep (parent) run."""
    client = MlflowClient(tracking_uri=tracking_uri)
    names = []
    for exp in client.search_experiments():
        if client.search_runs([exp.experiment_id], schema.tag_filter(schema.ROLE_TAG, schema.ROLE_SWEEP),
                              max_results=1):
            names.append(exp.name)
    return sorted(names)


def run_everything(tracking_uri: Optional[str], out_dir: str, log_to_mlflow: bool = True,
                   options: Optional[dict] = None) -> dict:
    """Every figure of every sweep at `tracking_uri` (one sub-folder per experiment) plus an index page."""
    out_dir = os.path.abspath(str(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    per = {name: run("all", name, tracking_uri, os.path.join(out_dir, name), log_to_mlflow=log_to_mlflow,
                     options=options)
           for name in sweep_experiments(tracking_uri)}
    rows = "".join(f"<li><a href='{html.escape(name)}/report.html'>{html.escape(name)}</a>: "
                   f"{sum(p.endswith('.png') for p in r['figures'])} figures, {len(r['tables'])} tables, "
                   f"{len(r['missing'])} missing</li>" for name, r in per.items())
    index = os.path.join(out_dir, "index.html")
    with open(index, "w") as f:
        f.write(f"<!doctype html><meta charset='utf-8'><title>prunelab sweeps</title><h1>prunelab sweeps</h1>"
                f"<ul>{rows or '<li>no sweep runs found</li>'}</ul>")
    return {"experiments": per, "index": index}


__all__ = ["FIGURES", "make_figures", "run", "run_everything", "sweep_experiments"]
