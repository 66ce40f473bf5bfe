"""The HTML report: one page linking every plot, table and the sweep config, and listing what is missing."""

from __future__ import annotations

import html
import os
from datetime import datetime, timezone

from prunelab.schema import SWEEP_CONFIG

from .output import FigureResult


def _md_to_html(md: str) -> str:
    lines = [l for l in md.strip().splitlines() if l.startswith("|")]
    if len(lines) < 2:
        return f"<pre>{html.escape(md)}</pre>"
    cells = [[html.escape(c.strip()) for c in l.strip("|").split("|")] for l in lines]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[2:])
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(out_dir: str, sweep_info: dict, results: list[FigureResult], general_missing: list[str],
                 config_path: str | None) -> str:
    """Write `out_dir/report.html` (links relative, so the folder can be moved or logged as is)."""
    rel = lambda p: html.escape(os.path.relpath(p, out_dir))  # noqa: E731
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>prunelab analysis</title><style>",
             "body{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}"
             "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}.missing{color:#a00}.note{color:#555}",
             "</style></head><body>", "<h1>prunelab analysis</h1><table>"]
    for k, v in sweep_info.items():
        parts.append(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>")
    parts.append(f"<tr><th>generated</th><td>{datetime.now(timezone.utc).isoformat(timespec='seconds')}</td></tr>")
    cfg = f"<a href='{rel(config_path)}'>{SWEEP_CONFIG}</a>" if config_path else \
        f"<span class='missing'>parent run has no {SWEEP_CONFIG} artifact</span>"
    parts.append(f"<tr><th>sweep config</th><td>{cfg}</td></tr></table>")
    made = [r for r in results if r.made]
    absent = [r for r in results if not r.made]
    parts.append("<h2>Contents</h2><ul>" + "".join(f"<li><a href='#{r.name}'>{e(r.title)}</a></li>" for r in made)
                 + "".join(f"<li class='missing'>{e(r.title)}: not made (no data)</li>" for r in absent) + "</ul>")
    if general_missing:
        parts.append("<h2>Missing or failed runs</h2><ul>" +
                     "".join(f"<li class='missing'>{e(m)}</li>" for m in general_missing) + "</ul>")
    for r in results:
        parts.append(f"<h2 id='{r.name}'>{e(r.title)}</h2>")
        if not r.made:
            parts.append("<p class='missing'>Not made.</p>")
        for p in r.figures:
            if p.endswith(".png"):
                svg = p[:-4] + ".svg"
                parts.append(f"<p><a href='{rel(svg)}'><img src='{rel(p)}' alt='{rel(p)}'></a><br>"
                             f"<a href='{rel(p)}'>PNG</a> · <a href='{rel(svg)}'>SVG</a></p>")
        for md in r.markdown:
            parts.append(_md_to_html(md))
        if r.tables:
            parts.append("<p>Tables: " + " · ".join(f"<a href='{rel(t)}'>{e(os.path.basename(t))}</a>"
                                                     for t in r.tables) + "</p>")
        if r.missing:
            parts.append("<p><b>Missing:</b></p><ul>" + "".join(f"<li class='missing'>{e(m)}</li>" for m in r.missing)
                         + "</ul>")
        if r.notes:
            parts.append("<ul>" + "".join(f"<li class='note'>{e(n)}</li>" for n in r.notes) + "</ul>")
    parts.append("</body></html>")
    path = os.path.join(out_dir, "report.html")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
