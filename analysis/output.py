"""What a figure module returns, and the writers every module shares (PNG+SVG, CSV, Markdown)."""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


@dataclass
class FigureResult:
    """Outputs of one figure: files written, pieces missing (by name), and notes on choices made."""

    name: str
    title: str
    figures: list = field(default_factory=list)
    tables: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    markdown: list = field(default_factory=list)  # Markdown tables to show inline in the report

    @property
    def made(self) -> bool:
        return bool(self.figures or self.tables)


def slug(*parts) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.]+", "-", str(p)).strip("-") for p in parts if p != "")


def save_fig(fig, out_dir: str, stem: str, res: FigureResult) -> None:
    """Write `stem`.png and `stem`.svg and record both."""
    for ext in ("png", "svg"):
        path = os.path.join(out_dir, f"{stem}.{ext}")
        fig.savefig(path, dpi=120 if ext == "png" else None, bbox_inches="tight")
        res.figures.append(path)
    plt.close(fig)


def fmt(v, digits: int = 6):
    """CSV cell: floats rounded (NaN/None as empty), everything else as is."""
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{digits}g}"
    return v


def write_csv(out_dir: str, name: str, header: list[str], rows: list[list], res: FigureResult) -> str:
    path = os.path.join(out_dir, name)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([fmt(v) for v in r])
    res.tables.append(path)
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(fmt(v, 4)) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
