"""The study's numbers and report (`bench/study.py`): each task's metrics, the learning rate
chosen on validation, test means and spreads, the paper's two claims checked, optimizer-state
memory, routing curves and their figure, and ``results.md``.

Works on plain data, the runs' result dicts and the settings as the report's JSON holds them
(``report["settings"]``, `bench.study.StudySettings` as a dict), so it can be read and tested
apart from the training, and never imports the study.
"""

from __future__ import annotations

import math
from pathlib import Path

from bench.study_data import RELATIONS
from molf_ds.train.methods import METHODS

# The modes compared: every mode of molf-train's table, in its order (every table's rows).
COMPARED_MODES = tuple(METHODS)


def options_label(options: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in options.items())


# ---- the metrics of each task --------------------------------------------------------------
# The numbers a run is compared by, per task; the first is the one the learning rate is chosen by.
TASK_METRICS = {"fact": ("score", "efficacy", "paraphrase", "kept"), "sql": ("exact_match",)}


def task_scores(task: str, metrics: dict[str, dict]) -> dict[str, dict[str, float]]:
    """``{"val": {metric: value}, "test": {...}}`` from the evaluators' outputs per split.

    fact: efficacy and paraphrase of the split's edits, ``kept`` (the share of untouched facts
    still known), and ``score``, CounterFact's summary: their harmonic mean, so an edit that
    generalises but erases other knowledge scores low (and so does one that changes nothing).
    """
    if task == "sql":
        return {split: {"exact_match": metrics[split]["exact_match"]} for split in ("val", "test")}
    out = {}
    for split in ("val", "test"):
        values = {
            "efficacy": metrics[split]["efficacy"],
            "paraphrase": metrics[split]["paraphrase"],
            "kept": metrics[f"kept_{split}"]["efficacy"],
        }
        out[split] = {"score": _harmonic_mean(values.values()), **values}
    return out


def _harmonic_mean(values) -> float:
    values = list(values)
    return 0.0 if min(values) <= 0 else len(values) / sum(1 / v for v in values)


# ---- stage 3: summary -------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def choose_option(val_scores: list[float]) -> int:
    """The grid option with the best validation score (the first one on a tie)."""
    return max(range(len(val_scores)), key=lambda i: (val_scores[i], -i))


def summarize(runs: list[dict], settings: dict) -> dict:
    """Per task and method: the option chosen on validation with the first seed (as the study
    chose it, `choose_option`), and that option's test metrics over every seed."""
    summary: dict = {}
    first_seed = settings["seeds"][0]
    for task, metrics in TASK_METRICS.items():
        summary[task] = {}
        for method in COMPARED_MODES:
            mine = [r for r in runs if r["task"] == task and r["method"] == method]
            if not mine:
                continue
            options = settings["grids"][method]
            grid = {r["option"]: r for r in mine if r["seed"] == first_seed}
            val = [grid[i]["scores"]["val"][metrics[0]] for i in range(len(options))]
            chosen = choose_option(val)
            at_chosen = sorted((r for r in mine if r["option"] == chosen), key=lambda r: r["seed"])
            test = {m: mean_std([r["scores"]["test"][m] for r in at_chosen]) for m in metrics}
            summary[task][method] = {
                "chosen": chosen,
                "options": options[chosen],
                "val_by_option": val,
                "test": {m: {"mean": v[0], "std": v[1]} for m, v in test.items()},
                "test_by_seed": {m: [r["scores"]["test"][m] for r in at_chosen] for m in metrics},
                "seeds": [r["seed"] for r in at_chosen],
                "final_loss": mean_std([r["final_loss"] for r in at_chosen])[0],
                "train_s": mean_std([r["train_s"] for r in mine])[0],
                "eval_s": mean_std([r["eval_s"] for r in mine])[0],
            }
    return summary


def compare(summary: dict, task: str, metric: str, method: str, against: list[str]) -> dict:
    """``method``'s test mean minus the best of ``against`` (absolute and relative), with the
    standard error of that difference over the seeds."""
    rows = summary[task]
    best = max(against, key=lambda m: rows[m]["test"][metric]["mean"])
    a, b = rows[method]["test"][metric], rows[best]["test"][metric]
    n_a, n_b = len(rows[method]["seeds"]), len(rows[best]["seeds"])
    gap = a["mean"] - b["mean"]
    se = math.sqrt(a["std"] ** 2 / n_a + b["std"] ** 2 / n_b)
    return {
        "method": method,
        "reference": best,
        "value": a["mean"],
        "reference_value": b["mean"],
        "gap": gap,
        "relative_gap": gap / b["mean"] if b["mean"] else float("nan"),
        "se": se,
    }


def claims(summary: dict) -> dict:
    """The paper's two claims, checked on every metric of every task."""
    within, beats = [], []
    for task, metrics in TASK_METRICS.items():
        if not all(m in summary[task] for m in COMPARED_MODES):
            continue
        for metric in metrics:
            row = compare(summary, task, metric, "molf", ["fft", "lora"])
            holds = row["gap"] >= -0.015 * row["reference_value"]  # (a 0 reference: gap >= 0)
            row.update(task=task, metric=metric, holds=holds)
            within.append(row)
            row = compare(summary, task, metric, "molf-efficient", ["adalora"])
            row.update(task=task, metric=metric, holds=row["gap"] > 0)
            beats.append(row)
    return {"molf_within_1.5pct_of_best_of_fft_lora": within, "molf_efficient_beats_adalora": beats}


def memory_table(runs: list[dict]) -> dict:
    """Per method: trainable parameters and the most optimizer state measured in any run."""
    table = {}
    for method in COMPARED_MODES:
        mine = [r for r in runs if r["method"] == method]
        if mine:
            table[method] = {
                "trainable_parameters": max(r["trainable_parameters"] for r in mine),
                "state_bytes": max(r["state_bytes"] for r in mine),
            }
    return table


LAYER_TYPES = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def routing_curves(runs: list[dict], summary: dict) -> dict:
    """Per task and routed method, at the chosen option, averaged over the seeds: per step the
    share of modules of each layer type (and of each projection) whose update went to the
    *tracked* expert -- the FFT expert for MoLF, the largest LoRA expert for MoLF-Efficient
    (whose frozen base never wins)."""
    curves: dict = {}
    for task in summary:
        for method, row in summary[task].items():
            routed = [
                r["routing"]
                for r in runs
                if r["task"] == task
                and r["method"] == method
                and r["option"] == row["chosen"]
                and "routing" in r
            ]
            if not routed:
                continue
            names, experts = routed[0]["module_names"], routed[0]["expert_names"]
            tracked = 0 if method == "molf" else len(experts) - 1
            projections = [p for ps in LAYER_TYPES.values() for p in ps]
            curves.setdefault(task, {})[method] = {
                "tracked_expert": experts[tracked],
                "by_type": {
                    t: _share_curve(routed, _rows(names, ps), tracked)
                    for t, ps in LAYER_TYPES.items()
                },
                "by_projection": {
                    p: _share_curve(routed, _rows(names, (p,)), tracked) for p in projections
                },
            }
    return curves


def _rows(module_names: list[str], projections: tuple[str, ...]) -> list[int]:
    return [i for i, name in enumerate(module_names) if name.endswith(projections)]


def _share_curve(routed: list[dict], rows: list[int], expert: int) -> list[float]:
    """Per step, the share of (run, module in ``rows``) pairs whose winner was ``expert``, over
    the runs that applied the step (a skipped step has no winners: None; NaN if none did)."""
    curve = []
    for step in range(len(routed[0]["winners"])):
        applied = [r["winners"][step] for r in routed if r["winners"][step] is not None]
        won = sum(winners[i] == expert for winners in applied for i in rows)
        curve.append(won / (len(applied) * len(rows)) if applied else math.nan)
    return curve


def plot_routing(curves: dict, settings: dict, path: Path) -> Path:
    """One panel per task and routed method: the share of modules taking the tracked expert's
    update per step, attention vs MLP (thick), each projection (thin)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = [t for t in ("fact", "sql") if t in curves]
    methods = [m for m in ("molf", "molf-efficient") if any(m in curves[t] for t in tasks)]
    fig = Figure(figsize=(5.2 * len(methods), 3.4 * len(tasks)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(tasks), len(methods), squeeze=False, sharey=True)
    colours = {"attention": "tab:blue", "mlp": "tab:orange"}
    for row, task in enumerate(tasks):
        for col, method in enumerate(methods):
            ax = axes[row][col]
            curve = curves[task].get(method)
            if curve is None:
                ax.set_axis_off()
                continue
            for layer_type, projections in LAYER_TYPES.items():
                for p in projections:
                    y = curve["by_projection"][p]
                    ax.plot(range(1, len(y) + 1), y, color=colours[layer_type], lw=0.6, alpha=0.35)
                y = curve["by_type"][layer_type]
                label = f"{layer_type} ({'/'.join(p.split('_')[0] for p in projections)})"
                ax.plot(range(1, len(y) + 1), y, color=colours[layer_type], lw=2, label=label)
            ranks = settings["ranks"][method]
            tracked = curve["tracked_expert"]
            what = "FFT expert" if tracked == "fft" else f"rank-{max(ranks)} LoRA expert"
            ax.set(
                title=f"{task}: {method}",
                xlabel="step",
                ylabel=f"share of modules updating\nthe {what}",
                ylim=(-0.03, 1.03),
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def _early_late(series: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last fifth of the steps."""
    k = max(1, len(series) // 5)
    return sum(series[:k]) / k, sum(series[-k:]) / k


# ---- the report ------------------------------------------------------------------------------
METRIC_LABELS = {
    "score": "fact score",
    "efficacy": "fact efficacy",
    "paraphrase": "fact paraphrase",
    "kept": "facts kept",
    "exact_match": "SQL exact match",
}


def _pm(cell: dict) -> str:
    return f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"


def write_report(report: dict, out: Path) -> Path:
    """``out/results.md`` from the study's report (the same numbers as the JSON summary)."""
    summary, pre, settings = report["summary"], report["pretraining"], report["settings"]
    pretrain = settings["pretrain"]
    lines = [
        "# Study: FFT vs LoRA vs AdaLoRA vs MoLF vs MoLF-Efficient at CPU scale",
        "",
        "Generated by `python -m bench.study` (do not edit: rerun it). Command:",
        "",
        f"    {report['command']}",
        "",
        _wall_time_line(report),
        "",
        "## Set-up",
        "",
        f"- **Model**: molf-train's `{pretrain['model']}` preset (Qwen2: hidden 64, 4 "
        f"layers, {pre['parameters']:,} parameters, byte tokenizer), **pretrained** from "
        f"scratch for {pretrain['steps']} steps of {pretrain['batch_size']} packed "
        f"samples of ≤ {pretrain['seq_len']} bytes (AdamW, lr "
        f"{pretrain['lr']:g}, cosine; {pre['processes']} data-parallel processes) on a "
        f"generated corpus: {pre['fact_lines']} fact "
        f"sentences ({pre['facts']} invented facts: {pretrain['subjects']} people × "
        f"{len(RELATIONS)} relations — native language, occupation, residence, instrument — each "
        f"in 5 phrasings) and {pre['sql_documents']} SQL documents (a question of the embedded "
        "SQL task as a `--` comment above its statement; the fine-tuning task's validation and "
        "test statements left out). Final pretraining loss "
        f"{pre['final_loss']:.3f} nats/byte.",
        f"- **Knowledge check** (the `fact` evaluator on every fact, true object vs the "
        f"counterfactual one): the pretrained model prefers the true object for "
        f"**{100 * pre['known']['efficacy']:.1f} %** of the facts on the edit prompt and "
        f"{100 * pre['known']['paraphrase']:.1f} % on the paraphrases (untrained model: "
        f"{100 * pre['known_untrained']['efficacy']:.1f} % / "
        f"{100 * pre['known_untrained']['paraphrase']:.1f} %). "
        + (
            "So the edits below overwrite facts the model knows."
            if pre["known"]["efficacy"] >= 0.9
            else "**Too low: the fact-editing results below do not mean much.**"
        ),
        "- **fact** (counterfactual editing, CounterFact's schema): "
        f"{2 * settings['fact_edits']} known facts are rewritten to another object of their "
        f"relation in one fine-tuning run ({settings['fact_steps']} steps of "
        f"{settings['batch_size']}, training on the edit prompt "
        f"only); {settings['fact_edits']} of the edits are the validation split, "
        f"{settings['fact_edits']} the test split. Metrics: efficacy (the new object beats the "
        "true one after the edit prompt), paraphrase (the same on the 4 other phrasings, never "
        "trained on), kept (the share of the untouched facts — other people, other relations — "
        "still known; half scored with validation, half with test) and score, their harmonic "
        "mean (CounterFact's summary; the learning rate is chosen by it).",
        "- **sql** (the `sql` task's embedded generator, Gretel's schema): "
        f"{settings['sql_train']} training records, {settings['sql_val']} validation, "
        f"{settings['sql_test']} test (a fixed split), {settings['sql_steps']} steps of "
        f"{settings['batch_size']}; metric: exact match of the greedy generation (the `sql` "
        "evaluator).",
        "- **Methods**: each run is molf-train's own `Recipe` (`molf_ds.train.recipe`): its "
        "set-up from the pretrained model's directory and the task's training records (a "
        "`data=` file, `eval_fraction=0`), the model and optimizer built by molf-train's table "
        "(`molf_ds.train.methods.METHODS`: `build_model`, `build_engine`, `after_backward`) on "
        "a single-process DeepSpeed engine (`ds_config=zero0`, fp32, gradient clipping 1.0, "
        f"warm-up {settings['warmup_steps']} steps then cosine), then molf-train's step, "
        "`Recipe.train_step`, for every step (the method's hook after each backward; "
        "non-finite steps skipped). "
        + "; ".join(f"`{m}`: {_method_shape(m, settings)}" for m in COMPARED_MODES)
        + ".",
        f"- **Learning rates**: a grid of {len(settings['grids']['fft'])} options per method, each "
        f"run with seed {settings['seeds'][0]}; the option with the best validation score is then "
        "run with the other seeds and reported on the test split over all of them (seeds "
        f"{', '.join(map(str, settings['seeds']))}: LoRA initialisation and data order; the splits "
        "are fixed).",
        "",
        "## Results (test split, % mean ± std over the seeds, at the learning rate chosen on "
        "validation)",
        "",
    ]
    lines += _results_table(report)
    lines += ["", "## The paper's claims at this scale", ""]
    lines += _claims_section(report["claims"])
    lines += ["", "## Optimizer-state memory (measured)", ""]
    lines += _memory_section(report["memory"])
    lines += ["", "## Routing dynamics", ""]
    lines += _routing_section(report, settings)
    lines += ["", "## Learning-rate grid (validation, first seed; chosen in bold)", ""]
    lines += _grid_table(summary, settings)
    lines += ["", "## Discussion", ""]
    lines += _discussion(report, settings)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _wall_time_line(report: dict) -> str:
    """Wall and CPU time, and how busy the machine was: on a shared machine the wall time says
    as much about the other jobs as about the study; the CPU time does not."""
    pre = report["pretraining"]
    minutes = report["wall_s"] / 60
    pretraining = (
        f"cached (it took {pre['wall_s'] / 60:.1f} min when it ran)"
        if pre["cached"]
        else f"{pre['wall_s'] / 60:.1f} min"
    )
    cpu = report["cpu_s"] + (pre.get("cpu_s", 0.0) if pre["cached"] else 0.0)
    shared = max(report["load_start"], report["load_end"]) > report["cpus"]
    return (
        f"Wall time: **{minutes:.1f} min** in all on a machine with {report['cpus']} CPU cores "
        f"(pretraining {pretraining}; {len(report['runs'])} fine-tuning runs "
        f"{report['finetune_wall_s'] / 60:.1f} min on {report['workers']} worker processes of "
        f"one thread each). Load average {report['load_start']:.1f} at the start and "
        f"{report['load_end']:.1f} at the end"
        + (": other jobs shared the machine." if shared else ".")
        + f" CPU time of every process of the study: {cpu / 60:.1f} min"
        + (" with the pretraining's" if pre["cached"] and "cpu_s" in pre else "")
        + (" (the cached pretraining's not known)" if pre["cached"] and "cpu_s" not in pre else "")
        + "; each stage keeps two single-thread processes busy, so on 2 cores of its own the "
        f"study needs about half that: ~{cpu / 120:.1f} min."
    )


def _method_shape(method: str, settings: dict) -> str:
    ranks = settings["ranks"][method]
    return {
        "fft": "every weight (embeddings and norms too), AdamW",
        "lora": f"PEFT LoRA r={ranks[0]} (rsLoRA, alpha 16) on q/k/v/o/gate/up/down, AdamW",
        "adalora": f"PEFT AdaLoRA from r={ranks[0]} to an average of {max(1, ranks[0] // 2)}, "
        "AdamW, ranks re-allocated after each backward",
        "molf": f"`molf_ds.wrap` FFT expert + LoRA r={ranks[0]}, `MoLFAdamW` top-1 (EPD); "
        "embeddings and norms, outside the router, take plain AdamW at lr",
        "molf-efficient": "`molf_ds.wrap` base frozen, LoRA experts r="
        + "+".join(map(str, ranks))
        + ", `MoLFAdamW` top-1 (EPD)",
    }[method]


def _results_table(report: dict) -> list[str]:
    summary, baseline = report["summary"], report["pretrained_scores"]
    columns = [(t, m) for t, ms in TASK_METRICS.items() for m in ms if t in summary]
    head = "| method | learning rate (chosen) | " + " | ".join(METRIC_LABELS[m] for _, m in columns)
    lines = [head + " |", "|---" * (len(columns) + 2) + "|"]
    cells = [f"{100 * baseline[t][m]:.1f}" for t, m in columns]
    lines.append("| pretrained, not fine-tuned | — | " + " | ".join(cells) + " |")
    for method in COMPARED_MODES:
        lrs = {
            t: options_label(summary[t][method]["options"]) for t in summary if method in summary[t]
        }
        if not lrs:
            continue
        lr_text = "; ".join(f"{t}: {v}" for t, v in lrs.items())
        cells = [
            _pm(summary[t][method]["test"][m]) if method in summary[t] else "—" for t, m in columns
        ]
        lines.append(f"| {method} | {lr_text} | " + " | ".join(cells) + " |")
    return lines


def _relative(row: dict) -> str:
    relative = row["relative_gap"]
    return "—" if math.isnan(relative) else f"{100 * relative:+.1f} %"


CLAIMS = (  # (key in the checked claims, heading, the table's last two column names)
    (
        "molf_within_1.5pct_of_best_of_fft_lora",
        "**Claim 1: MoLF stays within 1.5 % of the better of FFT and LoRA on every task.** "
        "Gap = MoLF − the better of the two (test means); relative = gap / the better's mean; "
        "SE = standard error of the gap over the seeds.",
        ("better of FFT, LoRA", "MoLF", "within 1.5 %?"),
    ),
    (
        "molf_efficient_beats_adalora",
        "**Claim 2: MoLF-Efficient beats AdaLoRA (by up to 20 % on factual knowledge).**",
        ("AdaLoRA", "MoLF-Efficient", "beats AdaLoRA?"),
    ),
)


def _claims_section(checked: dict) -> list[str]:
    lines: list[str] = []
    for key, heading, (reference, method, question) in CLAIMS:
        lines += [
            *([""] if lines else []),
            heading,
            "",
            f"| task | metric | {reference} | {method} | gap (points) | relative | SE (points) "
            f"| {question} |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in checked[key]:
            lines.append(_claim_row(row, "yes" if row["holds"] else "**no**"))
    return lines


def _claim_row(row: dict, verdict: str) -> str:
    reference = f"{row['reference']} {100 * row['reference_value']:.1f}"
    relative_text = _relative(row)
    resolved = abs(row["gap"]) >= 2 * row["se"] if row["se"] > 0 else True
    return (
        f"| {row['task']} | {METRIC_LABELS[row['metric']]} | {reference} | "
        f"{100 * row['value']:.1f} | {100 * row['gap']:+.1f} | {relative_text} | "
        f"{100 * row['se']:.1f}{'' if resolved else ' (gap < 2 SE)'} | {verdict} |"
    )


def _memory_section(memory: dict) -> list[str]:
    lines = [
        "Bytes of every tensor the optimizer keeps (AdamW's two moments and step counts; "
        "`MoLFAdamW` keeps moments for *every* expert, winner or not), plus AdaLoRA's "
        "sensitivity averages held by PEFT's rank allocator, at the step where the sum was "
        "largest. fp32 throughout.",
        "",
        "| method | trainable parameters | optimizer state | × LoRA | × FFT |",
        "|---|---|---|---|---|",
    ]
    lora, fft = memory["lora"]["state_bytes"], memory["fft"]["state_bytes"]
    for method, row in memory.items():
        b = row["state_bytes"]
        lines.append(
            f"| {method} | {row['trainable_parameters']:,} | {b:,} B ({b / 2**20:.2f} MiB) | "
            f"{b / lora:.2f} | {b / fft:.2f} |"
        )
    return lines


def _routing_section(report: dict, settings: dict) -> list[str]:
    curves = report["routing"]
    lines = [
        f"![routing]({report['routing_figure']})",
        "",
        "Share of routed modules whose update went to the tracked expert — the FFT expert for "
        "MoLF, the largest LoRA expert for MoLF-Efficient (its frozen base is no candidate) — "
        "per step, at the chosen learning rate, averaged over the seeds; thick: attention "
        "(q/k/v/o) and MLP (gate/up/down), thin: each projection. First and last fifth of the "
        "steps:",
        "",
        "| task | method | tracked expert | attention: first → last | MLP: first → last |",
        "|---|---|---|---|---|",
    ]
    for task, methods in curves.items():
        for method, curve in methods.items():
            cells = []
            for layer_type in LAYER_TYPES:
                early, late = _early_late(curve["by_type"][layer_type])
                cells.append(f"{100 * early:.0f} % → {100 * late:.0f} %")
            lines.append(
                f"| {task} | {method} | {curve['tracked_expert']} | " + " | ".join(cells) + " |"
            )
    return lines


def _grid_table(summary: dict, settings: dict) -> list[str]:
    options = max(len(grid) for grid in settings["grids"].values())
    lines = [
        "| task (metric) | method | "
        + " | ".join(f"option {i + 1}" for i in range(options))
        + " |",
        "|---|---|" + "---|" * options,
    ]
    for task, rows in summary.items():
        for method, row in rows.items():
            cells = []
            for i, options in enumerate(settings["grids"][method]):
                text = f"{options_label(options)}: {100 * row['val_by_option'][i]:.1f}"
                cells.append(f"**{text}**" if i == row["chosen"] else text)
            metric = METRIC_LABELS[TASK_METRICS[task][0]]
            lines.append(f"| {task} ({metric}) | {method} | " + " | ".join(cells) + " |")
    return lines


def _discussion(report: dict, settings: dict) -> list[str]:
    """What the numbers say, worded from them (so a rerun's text matches its numbers), then
    what limits them."""
    checked, memory, curves = report["claims"], report["memory"], report["routing"]
    within = checked["molf_within_1.5pct_of_best_of_fft_lora"]
    beats = checked["molf_efficient_beats_adalora"]
    lines = []
    failed = [r for r in within if not r["holds"]]
    noisy = [r for r in failed if abs(r["gap"]) < 2 * r["se"]]
    lines.append(
        f"- **Claim 1** holds on {len(within) - len(failed)} of {len(within)} task metrics. "
        + (
            "Where it fails: "
            + "; ".join(
                f"{METRIC_LABELS[r['metric']]} ({100 * r['gap']:+.1f} points vs "
                f"{r['reference']}, {_relative(r)})"
                for r in failed
            )
            + ". "
            + (
                f"{len(noisy)} of these gaps are smaller than twice their standard error over "
                f"{len(settings['seeds'])} seeds, i.e. not resolved by this study."
                if noisy
                else ""
            )
            if failed
            else "Every gap is above −1.5 %."
        )
    )
    won = [r for r in beats if r["holds"]]
    best = max(beats, key=lambda r: r["relative_gap"] if r["reference_value"] else -1, default=None)
    lines.append(
        f"- **Claim 2**: MoLF-Efficient beats AdaLoRA on {len(won)} of {len(beats)} task "
        "metrics"
        + (
            f"; the largest relative margin is {_relative(best)} "
            f"({METRIC_LABELS[best['metric']]}, "
            f"{100 * best['reference_value']:.1f} → {100 * best['value']:.1f})."
            if best
            else "."
        )
        + " AdaLoRA here is PEFT's, with a schedule squeezed into a few dozen steps "
        "(warm-up, rank budget, final phase: `methods._adalora_model`); that is a real handicap "
        "at this length and part of any margin."
    )
    lines.append(_memory_line(memory, settings))
    if "fact" in report["summary"]:
        kept = ", ".join(
            f"{m} {100 * row['test']['kept']['mean']:.0f} %"
            for m, row in report["summary"]["fact"].items()
        )
        before = 100 * report["pretrained_scores"]["fact"]["kept"]
        lines.append(
            f"- **What editing costs**: untouched facts still known after the edits (test half; "
            f"{before:.0f} % before): {kept}. The score (harmonic mean) is what chose each "
            "method's learning rate, so a rate that edits more at the price of other facts is "
            "not preferred."
        )
    for task, methods in curves.items():
        lines += [f"- **Routing, {task}**: " + _routing_words(m, c) for m, c in methods.items()]
    lines += [
        "- **Scale**: a 0.2M-parameter model with 64-wide layers, where a rank-8 LoRA spans "
        "1/8 of the width, a byte tokenizer, a hundred fine-tuning steps or fewer, "
        f"{len(settings['seeds'])} seeds and test sets of {settings['fact_edits']} edits "
        f"and {settings['sql_test']} questions: one edit is "
        f"{100 / settings['fact_edits']:.1f} points of efficacy and one question "
        f"{100 / settings['sql_test']:.1f} points of exact match, so gaps of a few points are "
        "within the noise, and the paper's 1.5 % threshold is below this study's resolution.",
        "- **What transfers and what does not**: the claims are about relative quality at "
        "the scale of the paper's models and data; this study checks that the machinery "
        "(routing in the optimizer, PEFT baselines, one harness) produces them the same way, "
        "and reports what happens on a tiny model. A claim that fails here may hold at scale "
        "and the reverse; what the study does show is measured directly: the memory cost of "
        "routing (every expert's moments), and how the router splits the work between FFT "
        "and LoRA as training goes.",
    ]
    return lines


def _memory_line(memory: dict, settings: dict) -> str:
    def ratio(a: str, b: str) -> str:
        return f"{memory[a]['state_bytes'] / memory[b]['state_bytes']:.2f}×"

    return (
        f"- **Memory**: MoLF keeps {ratio('molf', 'fft')} the optimizer state of FFT — the "
        "moments of every FFT parameter *and* of the LoRA expert, updated every step whoever "
        f"wins, since the router scores both; MoLF-Efficient {ratio('molf-efficient', 'lora')} "
        f"that of LoRA r={settings['ranks']['lora'][0]} (its experts' ranks add up to "
        f"{sum(settings['ranks']['molf-efficient'])}); AdaLoRA {ratio('adalora', 'lora')} LoRA's "
        "(its singular values' moments, and three sensitivity averages per parameter in PEFT's "
        "rank allocator until the ranks are final)."
    )


def _routing_words(method: str, curve: dict) -> str:
    """One sentence on a routed method's curve: first and last fifth per layer type, and the
    tracked expert's share over the whole run."""
    parts = []
    for layer_type in LAYER_TYPES:
        early, late = _early_late(curve["by_type"][layer_type])
        parts.append(f"{layer_type} {100 * early:.0f} % → {100 * late:.0f} %")
    series = [v for layer_type in LAYER_TYPES for v in curve["by_type"][layer_type]]
    overall = sum(series) / len(series)
    if method == "molf":
        text = "MoLF's share of modules taking the FFT update (first → last fifth): "
        text += ", ".join(parts) + f"; {100 * overall:.1f} % of module-steps overall."
        if overall < 0.01:
            text += (
                " The FFT expert (almost) never won: the routed layers trained as a LoRA, and "
                "only the layers outside the router (embeddings, norms) took full updates."
            )
        return text
    return (
        f"MoLF-Efficient's share of modules updating its largest LoRA expert "
        f"({curve['tracked_expert']}; first → last fifth): " + ", ".join(parts) + "."
    )


def json_summary(report: dict, path: Path, figure: Path) -> dict:
    """The stdout line: everything results.md states, without the per-run and per-step data."""
    return {
        "study": "molf_vs_baselines",
        "command": report["command"],
        "settings": report["settings"],
        "results_md": str(path),
        "routing_figure": str(figure),
        "wall_s": round(report["wall_s"], 1),
        "finetune_wall_s": round(report["finetune_wall_s"], 1),
        "cpu_s": round(report["cpu_s"], 1),
        "cpus": report["cpus"],
        "workers": report["workers"],
        "load_average": [report["load_start"], report["load_end"]],
        "runs": len(report["runs"]),
        "pretraining": report["pretraining"],
        "pretrained_scores": report["pretrained_scores"],
        "results": {
            task: {
                method: {
                    "options": row["options"],
                    "test": row["test"],
                    "val_by_option": row["val_by_option"],
                }
                for method, row in rows.items()
            }
            for task, rows in report["summary"].items()
        },
        "claims": report["claims"],
        "memory": report["memory"],
        # the routing table's numbers: the tracked expert's share, first and last fifth
        "routing": {
            task: {
                method: {
                    "tracked_expert": curve["tracked_expert"],
                    **{t: _early_late(curve["by_type"][t]) for t in LAYER_TYPES},
                }
                for method, curve in methods.items()
            }
            for task, methods in report["routing"].items()
        },
    }
