"""The study (`bench/study.py`, `bench/study_data.py`, `bench/study_report.py`): its data are what
they claim to be, its summary picks and reports what the numbers say, and ``--smoke`` runs every
stage end to end and writes a report whose numbers are the JSON summary's.

Expected values come from construction: records are checked against the facts they were built
from and against the `fact` task's own schema check; the summary and claims against runs whose
scores are set by hand; the optimizer-state measure against AdamW's known layout.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from bench import study, study_data, study_report
from molf_ds.train import sql_task, tasks

REPO = Path(__file__).resolve().parents[1]


# ---- data ------------------------------------------------------------------------------------
def test_counterfact_records_are_valid_and_edit_known_facts():
    facts = study_data.make_facts(12, seed=3)
    truth = {(f.subject, f.relation.relation_id): f.obj for f in facts}
    splits = study_data.fact_splits(facts, 8, seed=3)
    fact_task = tasks.get("fact")
    every = splits.val + splits.test + splits.kept_val + splits.kept_test + splits.known
    for i, record in enumerate(every):
        fact_task.check_record(record, i, "study")  # CounterFact's schema, as the task reads it
    edited = splits.val + splits.test
    assert len(splits.val) == len(splits.test) == 8
    for record in edited:
        rewrite = record["requested_rewrite"]
        true = truth[(rewrite["subject"], rewrite["relation_id"])]
        assert rewrite["target_true"]["str"] == true
        assert rewrite["target_new"]["str"] != true
        assert len(record["paraphrase_prompts"]) == 4
        assert all(rewrite["subject"] in p for p in record["paraphrase_prompts"])
    edited_keys = {
        (r["requested_rewrite"]["subject"], r["requested_rewrite"]["relation_id"]) for r in edited
    }
    kept = splits.kept_val + splits.kept_test
    for record in kept + splits.known:  # "new" is the true object: efficacy = share known
        rewrite = record["requested_rewrite"]
        assert rewrite["target_new"]["str"] == truth[(rewrite["subject"], rewrite["relation_id"])]
    kept_keys = {
        (r["requested_rewrite"]["subject"], r["requested_rewrite"]["relation_id"]) for r in kept
    }
    assert not kept_keys & edited_keys
    assert len(kept_keys | edited_keys) == len(facts) == len(splits.known)


def test_pretraining_corpus_states_every_fact_and_no_held_out_statement():
    facts = study_data.make_facts(6, seed=0)
    lines = study_data.fact_sentences(facts)
    for f in facts:
        for phrasing in f.relation.phrasings:
            assert f"{phrasing.format(f.subject)} {f.obj}." in lines
    splits = study_data.sql_splits(100, 10, 20)
    held_out = {sql_task.normalize_sql(r["sql"]) for r in splits.val + splits.test}
    documents = study_data.sql_documents(splits.val + splits.test)
    statements = {sql_task.normalize_sql(d.split("\n")[1]) for d in documents}
    assert documents and not statements & held_out
    assert all(d.startswith("-- ") and d.count("\n") == 1 for d in documents)


def test_packed_samples_hold_whole_lines_within_the_length():
    import random

    short, long = ["a b.", "c d e."], ["-- q?\nSELECT x FROM t;"]
    stream = study_data.packed_samples(short, long, 0.5, 40, random.Random(0))
    pieces = set(short) | {line for doc in long for line in doc.split("\n")}
    for _ in range(50):
        text = next(stream)
        assert len(text.encode()) <= 40
        assert set(text.split("\n")) <= pieces


# ---- measures ----------------------------------------------------------------------------------
def test_optimizer_state_bytes_is_adamws_two_moments_and_step_counts():
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    assert study.optimizer_state_bytes(optimizer) == 0  # state is created by the first step
    model(torch.ones(1, 5)).sum().backward()
    optimizer.step()
    numel = sum(p.numel() for p in model.parameters())
    steps = len(list(model.parameters()))  # one float32 step count per parameter
    assert study.optimizer_state_bytes(optimizer) == numel * 2 * 4 + steps * 4


# ---- summary and claims --------------------------------------------------------------------------
def _run(task, method, option, seed, val, test):
    return {
        "task": task,
        "method": method,
        "option": option,
        "seed": seed,
        "scores": {"val": {"exact_match": val}, "test": {"exact_match": test}},
        "final_loss": 0.1,
        "train_s": 1.0,
        "eval_s": 1.0,
        "trainable_parameters": 10,
        "state_bytes": 80,
    }


def _settings(options: int = 2):
    grid = ({"lr": 1e-3}, {"lr": 3e-3})[:options]
    grids = dict.fromkeys(study_report.COMPARED_MODES, grid)
    return asdict(study.StudySettings(seeds=(0, 1), grids=grids))  # as the report's JSON has them


def test_summary_chooses_on_validation_and_reports_test_over_seeds():
    # option 1 wins on validation with the first seed (0.7 vs 0.5) although option 0 is better
    # on test; the second seed's validation scores play no part in the choice
    runs = [
        _run("sql", "fft", 0, 0, 0.5, 0.9),
        _run("sql", "fft", 0, 1, 0.9, 0.9),
        _run("sql", "fft", 1, 0, 0.7, 0.2),
        _run("sql", "fft", 1, 1, 0.1, 0.4),
    ]
    row = study_report.summarize(runs, _settings())["sql"]["fft"]
    assert row["chosen"] == 1 and row["options"] == {"lr": 3e-3}
    assert row["val_by_option"] == pytest.approx([0.5, 0.7])
    assert row["test"]["exact_match"]["mean"] == pytest.approx(0.3)
    assert row["test"]["exact_match"]["std"] == pytest.approx(0.1 * 2**0.5)  # sample std


def test_grid_search_runs_the_other_seeds_at_the_option_chosen_on_validation():
    settings = study.StudySettings(seeds=(4, 5, 6))
    search = study.GridSearch(settings)
    first = search.first_jobs()
    assert {j.seed for j in first} == {4} and first[0].task == "sql"  # the longest runs first
    grid = [j for j in first if (j.task, j.method) == ("sql", "lora")]
    scores = [0.2, 0.6, 0.4]  # option 1 is best on validation
    follow_ups = []
    for job, score in zip(grid, scores, strict=True):
        follow_ups += search.follow_up(_run("sql", "lora", job.option, 4, score, 0.0))
    assert follow_ups == [study.Job("sql", "lora", 1, 5), study.Job("sql", "lora", 1, 6)]
    assert search.follow_up(_run("sql", "lora", 1, 5, 0.9, 0.0)) == []
    per_task = sum(len(g) for g in settings.grids.values()) + len(study_report.COMPARED_MODES) * 2
    assert search.total() == 2 * per_task == len(first) + 2 * len(study_report.COMPARED_MODES) * 2


def _summary_with(values: dict[str, float]) -> dict:
    runs = [
        _run("sql", method, 0, seed, value, value)
        for method, value in values.items()
        for seed in (0, 1)
    ]
    return study_report.summarize(runs, _settings(options=1))


def test_claim_one_holds_within_one_and_a_half_percent_of_the_better_baseline():
    base = {"adalora": 0.5, "molf-efficient": 0.6, "fft": 0.80, "lora": 0.70}
    held = study_report.claims(_summary_with({**base, "molf": 0.79}))
    broken = study_report.claims(_summary_with({**base, "molf": 0.78}))
    [row] = [r for r in held["molf_within_1.5pct_of_best_of_fft_lora"] if r["task"] == "sql"]
    assert row["reference"] == "fft" and row["gap"] == pytest.approx(-0.01) and row["holds"]
    [row] = [r for r in broken["molf_within_1.5pct_of_best_of_fft_lora"] if r["task"] == "sql"]
    assert row["relative_gap"] == pytest.approx(-0.025) and not row["holds"]
    [row] = held["molf_efficient_beats_adalora"]
    assert row["gap"] == pytest.approx(0.1) and row["holds"]


def test_routing_curves_count_the_tracked_expert_per_layer_type_and_step():
    names = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    names += [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    # step 0: every attention module and no MLP module took the FFT expert (index 0); step 1:
    # q_proj only
    winners = [[0, 0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]]
    routing = {"module_names": names, "expert_names": ["fft", "lora0"], "winners": winners}
    runs = [{**_run("sql", "molf", 0, 0, 0.5, 0.5), "routing": routing}]
    summary = {"sql": {"molf": {"chosen": 0}}}
    curve = study_report.routing_curves(runs, summary)["sql"]["molf"]
    assert curve["tracked_expert"] == "fft"
    assert curve["by_type"]["attention"] == [1.0, 0.25]
    assert curve["by_type"]["mlp"] == [0.0, 0.0]
    assert curve["by_projection"]["q_proj"] == [1.0, 1.0]
    # a second seed skipped step 1 (non-finite): that step's shares are the first seed's alone
    skipped = {**routing, "winners": [[1] * 7, None]}
    runs.append({**_run("sql", "molf", 0, 1, 0.5, 0.5), "routing": skipped})
    curve = study_report.routing_curves(runs, summary)["sql"]["molf"]
    assert curve["by_type"]["attention"] == [0.5, 0.25]


# ---- the command -------------------------------------------------------------------------------
def test_bad_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        study.parse_args(["--seeds", "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--seeds 0" in err


def _resolves(dotted: str) -> bool:
    """Whether ``dotted`` names a module or an attribute of one."""
    try:
        importlib.import_module(dotted)
        return True
    except ImportError:
        module, _, name = dotted.rpartition(".")
        return _resolves(module) and hasattr(importlib.import_module(module), name)


def test_report_module_never_imports_the_study():
    # the report reads the settings from the study's JSON: no import cycle between the two
    code = "import sys, bench.study_report; sys.exit('bench.study' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


@pytest.mark.slow
def test_smoke_study_writes_a_report_that_matches_its_json(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.study",
            "--smoke",
            "--out",
            str(tmp_path / "docs"),
            "--cache",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,  # `-m bench.study`: this repository's bench and molf_ds
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, lines[:-1]  # stdout is the JSON line alone; progress goes to stderr
    summary = json.loads(lines[0])
    report = (tmp_path / "docs" / "results.md").read_text()
    figure = tmp_path / "docs" / "results_routing.png"
    assert figure.stat().st_size > 1000 and "results_routing.png" in report
    assert summary["command"] in report
    assert summary["settings"]["seeds"] == [0]  # what the report read its settings from
    for dotted in re.findall(r"`(molf_ds(?:\.\w+)+)`", report):  # every code name it cites exists
        assert _resolves(dotted), dotted
    assert "{" not in report and "}" not in report  # every placeholder filled in
    assert summary["runs"] == len(study_report.COMPARED_MODES) * 2  # 1 seed, 1 option, 2 tasks
    for task, rows in summary["results"].items():
        assert set(rows) == set(study_report.COMPARED_MODES)
        for method, row in rows.items():
            cells = [
                f"{100 * row['test'][m]['mean']:.1f} ± {100 * row['test'][m]['std']:.1f}"
                for m in study_report.TASK_METRICS[task]
            ]
            line = next(x for x in report.splitlines() if x.startswith(f"| {method} |"))
            assert all(cell in line for cell in cells), (line, cells)
            assert all(0 <= row["test"][m]["mean"] <= 1 for m in row["test"])
    memory = {m: v["state_bytes"] for m, v in summary["memory"].items()}
    # MoLF keeps the FFT expert's moments and its LoRA expert's; MoLF-Efficient two LoRA experts'
    assert memory["molf"] > memory["fft"] > memory["molf-efficient"] > memory["lora"] > 0
    for method, value in memory.items():
        assert f"| {method} | " in report and f"{value:,} B" in report
    assert summary["cpu_s"] > 0 and f"{summary['cpu_s'] / 60:.1f} min" in report
    assert set(summary["routing"]) == {"fact", "sql"}
    pre = summary["pretraining"]
    assert 0 <= pre["known"]["efficacy"] <= 1 and pre["cached"] is False
    checked = summary["claims"]["molf_within_1.5pct_of_best_of_fft_lora"]
    assert {(r["task"], r["metric"]) for r in checked} == {
        (t, m) for t, ms in study_report.TASK_METRICS.items() for m in ms
    }
