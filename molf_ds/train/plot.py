"""``molf-plot RUN_DIR [--out DIR]``: PNG plots of a training run's loss and routing.

Reads ``metrics.jsonl`` and ``routing.jsonl`` (see `molf_ds.train.telemetry`) and writes

* ``loss.png``: train loss, and eval loss when logged, over steps;
* ``routing_share.png``: per expert, the share of modules it won at each step (for MoLF the
  ``fft`` line is the share of modules taking a full fine-tuning update);
* ``routing_heatmap_<type>.png`` per module type (``q_proj``, ``up_proj``, ...): layers x steps,
  coloured by the winning expert.

A run without routing (FFT, LoRA baselines) gets only ``loss.png``. Matplotlib draws with the
Agg canvas directly, so no display or pyplot state is involved.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from molf_ds.errors import MoLFError
from molf_ds.train.telemetry import (
    METRICS_FILE,
    ROUTING_FILE,
    RoutingStep,
    read_metrics,
    read_routing_log,
)

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``molf-plot``; prints each file written, returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="molf-plot", description="Plot a molf_ds run's loss and routing as PNG files."
    )
    parser.add_argument("run_dir", help="the run's output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", help="where to write the PNGs (default: RUN_DIR)")
    args = parser.parse_args(argv)
    try:
        written = plot_run(args.run_dir, args.out)
    except (MoLFError, OSError) as exc:
        print(f"molf-plot: error: {exc}", file=sys.stderr)
        return 1
    if not (Path(args.run_dir) / ROUTING_FILE).is_file():
        print(
            f"molf-plot: no {ROUTING_FILE} (not a MoLF run): routing plots skipped", file=sys.stderr
        )
    for path in written:
        print(path)
    return 0


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write every plot the run's logs allow; returns the paths written."""
    run = Path(run_dir)
    if not run.is_dir():
        raise MoLFError(f"{run} is not a directory; pass a training run's output_dir")
    metrics_path, routing_path = run / METRICS_FILE, run / ROUTING_FILE
    if not metrics_path.is_file() and not routing_path.is_file():
        raise MoLFError(
            f"{run} has neither {METRICS_FILE} nor {ROUTING_FILE}; pass a training run's output_dir"
        )
    # Read and check everything before writing anything.
    records = read_metrics(metrics_path) if metrics_path.is_file() else None
    if records is not None and not any(_series(records, k)[0] for k in ("loss", "eval_loss")):
        raise MoLFError(f"{metrics_path} has no 'loss' values; nothing to plot")
    routing = read_routing_log(routing_path) if routing_path.is_file() else None
    if routing is not None and not routing[1]:
        raise MoLFError(f"{routing_path} has no steps yet; plot after the first step")
    out = Path(out_dir) if out_dir is not None else run
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if records is not None:
        written.append(plot_loss(records, out / "loss.png"))
    if routing is not None:
        written.append(plot_routing_share(*routing, out / "routing_share.png"))
        written += plot_routing_heatmaps(*routing, out)
    return written


def plot_loss(records: list[dict[str, Any]], path: Path) -> Path:
    """Train ``loss`` and ``eval_loss`` over steps."""
    train = _series(records, "loss")
    evals = _series(records, "eval_loss")
    if not train[0] and not evals[0]:
        raise MoLFError("metrics have no 'loss' values; nothing to plot")
    fig, ax = _figure((7, 4))
    if train[0]:
        ax.plot(*train, label="train loss", linewidth=1.2)
    if evals[0]:
        ax.plot(*evals, label="eval loss", marker="o", linewidth=1.2)
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_routing_share(header: dict[str, Any], steps: list[RoutingStep], path: Path) -> Path:
    """Per candidate expert, the share of modules it won at each step."""
    import numpy as np

    x = [s.step for s in steps]
    winners = np.array([s.winners for s in steps], dtype=bool)  # [steps, modules, experts]
    share = winners.mean(axis=1)
    fig, ax = _figure((7, 4))
    for e, name in enumerate(header["expert_names"]):
        if not _is_candidate(steps, e):
            continue
        label = "fft (full fine-tuning)" if e == 0 else name
        ax.plot(x, share[:, e], label=label, linewidth=2.0 if e == 0 else 1.2)
    ax.set(xlabel="step", ylabel="share of modules", title="Share of modules each expert won")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_routing_heatmaps(
    header: dict[str, Any], steps: list[RoutingStep], out: Path
) -> list[Path]:
    """One heatmap per module type: layers x steps, colour = winning expert."""
    best = _best_winner(steps)  # [steps, modules], nan where no winner
    written = []
    for module_type, rows in _module_types(header["module_names"]).items():
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", module_type)
        written.append(
            _heatmap(header, steps, best, rows, module_type, out / f"routing_heatmap_{name}.png")
        )
    return written


def _heatmap(header, steps, best, rows, module_type: str, path: Path) -> Path:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm, ListedColormap

    experts = header["expert_names"]
    data = np.ma.masked_invalid(best[:, [row for row, _ in rows]].T)  # [layers, steps]
    palette = colormaps["tab10" if len(experts) <= 10 else "tab20"]
    cmap = ListedColormap([palette(i % palette.N) for i in range(len(experts))])
    norm = BoundaryNorm(np.arange(len(experts) + 1) - 0.5, len(experts))
    fig, ax = _figure((8, max(2.5, 0.3 * len(rows) + 1.5)))
    mesh = ax.pcolormesh(
        _edges([s.step for s in steps]), np.arange(len(rows) + 1) - 0.5, data, cmap=cmap, norm=norm
    )
    bar = fig.colorbar(mesh, ax=ax, ticks=range(len(experts)))
    bar.ax.set_yticklabels(experts)
    ticks = range(0, len(rows), max(1, math.ceil(len(rows) / 16)))
    ax.set_yticks(list(ticks), [rows[i][1] for i in ticks])
    ax.set(xlabel="step", ylabel="layer", title=f"Winning expert: {module_type}")
    return _save(fig, path)


def _module_types(module_names: Sequence[str]) -> dict[str, list[tuple[int, str]]]:
    """``{type: [(module row, layer label), ...]}`` ordered by layer index."""
    groups: dict[str, list[tuple[int, int, str]]] = {}
    for row, name in enumerate(module_names):
        match = _LAYER_INDEX.search(name)
        layer = int(match.group(1)) if match else -1
        label = str(layer) if match else name
        groups.setdefault(name.rpartition(".")[2], []).append((layer, row, label))
    return {t: [(row, label) for _, row, label in sorted(g)] for t, g in groups.items()}


def _best_winner(steps: list[RoutingStep]):
    """``[steps, modules]``: the highest-scoring winner's index (lower index on ties)."""
    import numpy as np

    winners = np.array([s.winners for s in steps], dtype=bool)
    scores = np.array([s.scores for s in steps], dtype=float)
    ranked = np.where(winners, np.nan_to_num(scores, nan=-np.inf), -np.inf)
    # A winner with a -inf score (rounding, or a score-less log) still beats non-winners.
    ranked = np.where(winners & np.isneginf(ranked), np.finfo(float).min, ranked)
    best = ranked.argmax(axis=2).astype(float)
    best[~winners.any(axis=2)] = np.nan
    return best


def _is_candidate(steps: list[RoutingStep], expert: int) -> bool:
    return any(
        won[expert] or math.isfinite(score[expert])
        for s in steps
        for won, score in zip(s.winners, s.scores, strict=True)
    )


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _edges(x: list[int]) -> list[float]:
    """Cell edges around (possibly irregular) step values."""
    if len(x) == 1:
        return [x[0] - 0.5, x[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(x, x[1:], strict=False)]
    return [x[0] - (mids[0] - x[0]), *mids, x[-1] + (x[-1] - mids[-1])]


def _figure(size: tuple[float, float]):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MoLFError("molf-plot needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


if __name__ == "__main__":
    sys.exit(main())
