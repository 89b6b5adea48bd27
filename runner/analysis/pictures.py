"""loss_curves.png: the loss per step (top) and how far each run's param_sum is from its
reference's (bottom, log axis), drawn by groups so that a hundred runs stay readable.

- A group is a configuration without its seed (runner.analysis.replicates): several seeds are
  drawn as their mean with a min-max band, not a line per seed.
- Colour: one per value of the key that matters most (the strategy, `backward`, where it varies);
  line style: one per combination of the other varying keys.
- A run of a single step is a marker (a line needs two points).
- The bottom panel shades what float32 rounding allows (torch.testing's tolerance at the
  reference's param_sum), so rounding drift and a real difference sit visibly apart; a run
  identical to its reference is drawn at a labelled floor.
- The legend names a dozen groups at most; beyond that it names the colours and the styles (two dozen
  entries at most), each label shortened to one line.
matplotlib is imported only here.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional

from runner.analysis.replicates import (
    SEED_KEY,
    configuration,
    groups,
    same_seed_reference,
)
from runner.analysis.runs import TOLERANCES, Run, varying_keys
from runner.recording import record

MOST_LEGEND_ENTRIES = 12
LEGEND_LABEL_CHARACTERS = 70
TITLE_CHARACTERS = 200  # the divergence panel's title: at most three lines
STYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)), (0, (3, 1, 1, 1)),
          (0, (1, 1)), (0, (5, 3, 1, 3, 1, 3)), (0, (10, 3, 1, 3))]
COLOUR_KEY = "backward"


def divergence(run: Run, paired: Optional[Run], read: Dict[Any, Dict[str, Any]]):
    """Per step, |param_sum - its reference's param_sum|, or None (`read`: curves by run path)."""
    column = record.BASE_COLUMNS[3]
    if paired is None or paired is run or column not in read[run.path] or column not in read[paired.path]:
        return None
    return (read[run.path][column] - read[paired.path][column]).abs().dropna()


def _draw_group(axis, curves: List[Any], colour, style, label: str, floor: Optional[float] = None) -> None:
    """One group's mean (a marker for a single step) and, for several runs, its min-max band."""
    import pandas as pd

    curves = [c for c in curves if c is not None and len(c)]
    if not curves:
        return
    frame = pd.concat(curves, axis=1)
    if floor is not None:  # a log axis: an exact 0 (identical to the reference) sits at the floor
        frame = frame.clip(lower=floor)
    mean, low, high = frame.mean(axis=1), frame.min(axis=1), frame.max(axis=1)
    identical = floor is not None and bool((mean <= floor).all())
    if len(frame) == 1:
        axis.errorbar(mean.index, mean.values, yerr=[mean.values - low.values, high.values - mean.values],
                      fmt="o", color=colour, markersize=5, capsize=3, label=label)
        return
    axis.plot(mean.index, mean.values, color=colour, linestyle=":" if identical else style, linewidth=1,
              label=label + (": identical to the reference" if identical else ""))
    if len(curves) > 1:
        axis.fill_between(mean.index, low.values, high.values, color=colour, alpha=0.18, linewidth=0)


def _floor(curves: List[Any]) -> float:
    nonzero = [float(c[c > 0].min()) for c in curves if c is not None and (c > 0).any()]
    return 10 ** (math.floor(math.log10(min(nonzero))) - 2) if nonzero else 1e-12


def _tolerance(reference: Optional[Run]) -> Optional[float]:
    """What torch.testing's tolerance of the reference's dtype allows a param_sum to move."""
    if reference is None or reference.summary.param_sum is None:
        return None
    rtol, atol = TOLERANCES.get(reference.summary.dtype or "float32", TOLERANCES["float32"])
    return atol + rtol * abs(reference.summary.param_sum)


def _legend(axis, members: Dict[tuple, List[Run]], colour_of, style_of, colour_key, style_keys) -> None:
    from matplotlib.lines import Line2D

    handles, labels = axis.get_legend_handles_labels()
    if not handles:
        return
    if len(members) > MOST_LEGEND_ENTRIES:  # the colours and the styles, not every group
        handles, labels = [], []
        for value, colour in colour_of.items():
            handles.append(Line2D([], [], color=colour))
            labels.append(f"{colour_key}={value}")
        for values, style in style_of.items():
            handles.append(Line2D([], [], color="black", linestyle=style))
            labels.append(", ".join(f"{k}={v}" for k, v in zip(style_keys, values)) or "runs")
        if len(handles) > 2 * MOST_LEGEND_ENTRIES:  # a legend taller than the axes would squeeze them to nothing
            more = len(handles) - 2 * MOST_LEGEND_ENTRIES + 1
            handles = handles[:2 * MOST_LEGEND_ENTRIES - 1] + [Line2D([], [], linestyle="none")]
            labels = labels[:2 * MOST_LEGEND_ENTRIES - 1] + [f"... {more} more"]
    # A label names every varying key: a sweep across experiments varies dozens, wider than the figure.
    labels = [textwrap.shorten(label, LEGEND_LABEL_CHARACTERS, placeholder=" ...") for label in labels]
    axis.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def draw(runs: List[Run], reference: Optional[Run], sweep_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    members = groups(runs)
    varying = [k for k in varying_keys(runs) if k != SEED_KEY]
    colour_key = COLOUR_KEY if COLOUR_KEY in varying else (varying[0] if varying else None)
    style_keys = [k for k in varying if k != colour_key]
    palette = plt.get_cmap("tab10").colors
    colour_of: Dict[Any, Any] = {}
    style_of: Dict[tuple, Any] = {}
    for group in members.values():
        colour_of.setdefault(group[0].keys.get(colour_key), palette[len(colour_of) % len(palette)])
        style_of.setdefault(tuple(group[0].keys.get(k) for k in style_keys), STYLES[len(style_of) % len(STYLES)])
    read = {r.path: record.read_curves(r.path) for r in runs}  # one read of each metrics.csv
    divergences = {r.path: divergence(r, same_seed_reference(r, reference, runs), read) for r in runs}
    floor = _floor(list(divergences.values()))
    reference_config = configuration(reference) if reference is not None else None

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8), sharex=True, layout="constrained")
    for config, group in members.items():
        first = group[0]
        label = ", ".join(f"{k}={first.keys.get(k)}" for k in varying) or "runs"
        label += " (reference)" if config == reference_config else ""
        label += f" ({len(group)} seeds: mean, min-max)" if len(group) > 1 else ""
        colour, style = colour_of[first.keys.get(colour_key)], style_of[tuple(first.keys.get(k) for k in style_keys)]
        _draw_group(top, [read[r.path].get(record.BASE_COLUMNS[1]) for r in group], colour, style, label)
        if config != reference_config:
            _draw_group(bottom, [divergences[r.path] for r in group], colour, style, label, floor)
    tolerance = _tolerance(reference)
    if tolerance is not None and tolerance > floor:
        bottom.axhspan(floor, tolerance, color="grey", alpha=0.12, linewidth=0)
        bottom.annotate(f"within {reference.summary.dtype or 'float32'} tolerance (rounding)", (0.01, tolerance),
                        xycoords=("axes fraction", "data"), xytext=(0, -10), textcoords="offset points",
                        fontsize=7, color="grey")
    bottom.axhline(floor, color="grey", linewidth=0.6, linestyle="--")
    bottom.annotate("floor: 0, identical to the reference", (0.01, floor), xycoords=("axes fraction", "data"),
                    xytext=(0, 3), textcoords="offset points", fontsize=7, color="grey")
    top.set_ylabel("loss")
    top.set_title("loss per optimizer step")
    bottom.set_yscale("log")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("|param_sum − reference's|")
    ref_label = ", ".join(f"{k}={reference.keys.get(k)}" for k in varying) if reference is not None else "none"
    same_seed = " at each run's own seed" if len({r.keys.get(SEED_KEY) for r in runs}) > 1 else ""
    # Long references wrap: a title wider than the axes is cut at the figure's edge.
    title = textwrap.shorten(f"divergence from the reference ({ref_label or 'the first run'}", TITLE_CHARACTERS,
                             placeholder=" ...") + f"){same_seed}"
    bottom.set_title(textwrap.fill(title, 80), fontsize="medium")
    _legend(top, members, colour_of, style_of, colour_key, style_keys)
    _legend(bottom, members, colour_of, style_of, colour_key, style_keys)
    path = record.save_figure(fig, sweep_dir)
    plt.close(fig)
    return path
