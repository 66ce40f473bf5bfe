"""One palette for every figure: a variant has one colour everywhere, a sparsity one marker.

Colours follow what a series *is* (`Chain.label`, or a Figure 6 source), never its position in a
plot, so `distilled ipc10` is the same blue in Figures 2, 3/4, 6 and 7 and in the report. The
colours are the Okabe–Ito set (distinguishable with the common colour-vision deficiencies).
"""

from __future__ import annotations

import re

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex

from .load import label_kind

# Okabe–Ito
BLACK, ORANGE, SKY, GREEN, YELLOW, BLUE, VERMILLION, PURPLE = (
    "#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")
GREY = "#7F7F7F"

IMP = VERMILLION
DENSE = GREY
THEN_IMP = PURPLE
# synthetic sets by images per class, smallest first (a set with an ipc not listed takes the nearest)
SYNTHETIC_BY_IPC = {1: SKY, 10: BLUE, 20: GREEN, 50: "#004D80", 100: "#00344F"}
SYNTHETIC_OTHER = "#999933"  # olive: no ipc colour
# Figure 6 controls: reference markers, hollow, in the colour of what they control
CONTROL_MARKERS = {"shuffled": "v", "reinit": "^"}

# the paper's two sparsities by their names: rounds 4 and 9 at 20% per round (59.0%, 86.6%)
TARGETS = {"60%": 1 - 0.8 ** 4, "87%": 1 - 0.8 ** 9}
NAME_TOLERANCE = 0.02  # a sparsity this close to a target is called by the target's name
# a marker per target sparsity (the paper's 60% and 87%), then for any other sparsity in turn
SPARSITY_MARKERS = {"60%": "o", "87%": "s"}
OTHER_MARKERS = ("D", "P", "X", "h", "p")  # no "*": Figure 6's IMP reference
# discrete colours for sparsities drawn side by side (Figures 3/4): light to dark
# (a grey ramp: no variant is grey-to-black but the dense network, which is never one of these)
SPARSITY_COLORS = ("#C8C8C8", "#9A9A9A", "#6B6B6B", "#3D3D3D", BLACK)
# markers that tell apart series of one colour (IMP k=3 and k=5, two then-IMP chains), in turn
SERIES_MARKERS = ("o", "s", "D", "^", "v", "P", "X")


def variant_color(label: str) -> str:
    """The colour of a series named by `Chain.label` (`IMP (k=0)`, `distilled ipc10`, `dense`, ...)."""
    kind = label_kind(label)
    if kind == "dense" or label.startswith("dense ("):  # `dense (k=K)`: the dense network at a rewind point
        return DENSE
    if kind == "then_imp":
        return THEN_IMP
    if kind == "imp":
        k = re.search(r"k=(\d+)", label)
        return IMP if not k or k.group(1) == "0" else ORANGE
    m = re.search(r"ipc(\d+)", label)
    if not m:
        return SYNTHETIC_OTHER
    ipc = int(m.group(1))
    return SYNTHETIC_BY_IPC[min(SYNTHETIC_BY_IPC, key=lambda k: (abs(k - ipc), k))]


def sparsity_label(sparsity: float) -> str:
    """`0.59 -> "60%"`, `0.866 -> "87%"` (the paper's names), else the rounded percentage."""
    for name, target in TARGETS.items():
        if abs(sparsity - target) < NAME_TOLERANCE:
            return name
    return f"{100 * sparsity:.0f}%"


def sparsity_marker(name_or_sparsity) -> str:
    """The marker of a target sparsity: `"60%"` / `0.59` -> "o", `"87%"` / `0.866` -> "s", others in turn."""
    name = name_or_sparsity if isinstance(name_or_sparsity, str) else sparsity_label(float(name_or_sparsity))
    if name in SPARSITY_MARKERS:
        return SPARSITY_MARKERS[name]
    digits = re.sub(r"\D", "", name) or "0"
    return OTHER_MARKERS[int(digits) % len(OTHER_MARKERS)]


def sparsity_colors(sparsities) -> dict:
    """Discrete colours for a few sparsities drawn in one panel, light (dense) to dark (sparse)."""
    ordered = sorted(set(sparsities))
    if len(ordered) <= len(SPARSITY_COLORS):
        # evenly spread over the ramp, so two sparsities are light and dark, not two near-blacks
        last = len(SPARSITY_COLORS) - 1
        steps = [round(i * last / (len(ordered) - 1)) for i in range(len(ordered))] if len(ordered) > 1 else [last]
        return {s: SPARSITY_COLORS[i] for s, i in zip(ordered, steps)}
    # viridis from its light end down: the same light-to-dark order as the few-sparsity colours
    cmap = colormaps["viridis"]
    return {s: to_hex(cmap(x)) for s, x in zip(ordered, np.linspace(0.9, 0.0, len(ordered)))}


def sparsity_names(sparsities) -> dict:
    """sparsity -> legend name: `sparsity_label`, with one decimal where two sparsities would share a name."""
    ordered = sorted(set(sparsities))
    names = {s: sparsity_label(s) for s in ordered}
    clash = {n for n in names.values() if list(names.values()).count(n) > 1}
    return {s: f"{100 * s:.1f}%" if n in clash else n for s, n in names.items()}


def series_markers(labels) -> dict:
    """label -> marker: "o" for the first series of each colour, the next markers for the others of it."""
    used: dict = {}
    out = {}
    for label in labels:
        k = used.get(variant_color(label), 0)
        used[variant_color(label)] = k + 1
        out[label] = SERIES_MARKERS[k % len(SERIES_MARKERS)]
    return out


def series_label(label: str, counts) -> str:
    """`IMP (k=0), n=3`: the series with its number of seeds (a range where rounds have different counts)."""
    ns = sorted({int(n) for n in counts if n})
    if not ns:
        return f"{label}, n=0"
    return f"{label}, n={ns[0]}" if len(ns) == 1 else f"{label}, n={ns[0]}–{ns[-1]}"
