"""`MoLFAdamW` on a device against the float64 CPU reference of tests/test_optimizer_exactness.py;
one JSON line per implementation.

    python -m bench.gpu_exactness --device cuda    # foreach and reference on the GPU, fused on CPU
    python -m bench.gpu_exactness --device cpu     # all three on the CPU

Every case of the test file (``CASES``: EPD and PFN scores, top-1 and top-2, weight decay,
MoLF-Efficient, clipped gradients, a module without gradient in some steps) trains its tiny model
on the device for 5 steps; each step the device gradients go (as float64, on the CPU) to the
reference, and every parameter, score and winner is compared with the test's tolerances. The
fused kernel runs on CPU tensors only, so it is checked on the CPU whatever ``--device`` says.
Per implementation: whether every case passed, the largest parameter difference, and the largest
difference as a share of the tolerance (1.0 = at the tolerance).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import molf_ds
from tests.test_optimizer_exactness import (
    CASES,
    PARAM_ATOL,
    PARAM_RTOL,
    SCORE_RTOL,
    STEPS,
    Case,
    _batch,
    _build_model,
    _ReferenceMoLFAdamW,
)

IMPLEMENTATIONS = {
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "reference": {"fused": False, "foreach": False},
}


def run_case(case: Case, impl: dict, device: str) -> dict:
    model = _build_model(case.lora_ranks, train_base=case.train_base, use_rslora=case.use_rslora)
    reference = _ReferenceMoLFAdamW(model, **case.opt_kwargs)  # float64 copies, on the CPU
    model.to(device)
    optimizer = molf_ds.MoLFAdamW(model, **impl, **case.opt_kwargs)
    worst = {"param_abs": 0.0, "param_tolerance_share": 0.0, "score_rel": 0.0}
    same_winners = True
    for step in range(STEPS):
        optimizer.zero_grad()
        tokens, target = _batch(step)
        out = model(tokens.to(device), skip=case.skip.get(step, ()))
        (out - target.to(device)).pow(2).mean().backward()
        if case.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), case.clip_norm)
        grads = {
            n: None if p.grad is None else p.grad.detach().double().cpu()
            for n, p in model.named_parameters()
            if p.requires_grad
        }
        expected = reference.step(grads)
        optimizer.step()
        routing = optimizer.last_routing
        same_winners &= routing.winners.cpu().tolist() == expected.winners.tolist()
        scores, candidates = routing.scores.double().cpu(), expected.candidates
        rel = (scores[candidates] - expected.scores[candidates]).abs() / expected.scores[
            candidates
        ].abs().clamp_min(1e-300)
        worst["score_rel"] = max(worst["score_rel"], float(rel.max()))
        params = dict(model.named_parameters())
        for ref_param in reference.params:
            got = params[ref_param.name].detach().double().cpu()
            diff = (got - ref_param.value).abs()
            tolerance = PARAM_ATOL + PARAM_RTOL * ref_param.value.abs()
            worst["param_abs"] = max(worst["param_abs"], float(diff.max()))
            share = float((diff / tolerance).max())
            worst["param_tolerance_share"] = max(worst["param_tolerance_share"], share)
    ok = same_winners and worst["param_tolerance_share"] <= 1.0 and worst["score_rel"] <= SCORE_RTOL
    return {"ok": ok, "same_winners": same_winners, **worst, "ran": routing.implementation}


def check(impl_name: str, device: str) -> dict:
    started = time.perf_counter()
    results = {
        name: run_case(case, IMPLEMENTATIONS[impl_name], device) for name, case in CASES.items()
    }
    return {
        "check": "exactness",
        "impl": impl_name,
        "device": device,
        "ok": all(r["ok"] for r in results.values())
        and all(r["ran"] == impl_name for r in results.values()),
        "cases": len(results),
        "failed_cases": [name for name, r in results.items() if not r["ok"]],
        "max_param_abs_err": max(r["param_abs"] for r in results.values()),
        "max_param_err_share_of_tolerance": max(
            r["param_tolerance_share"] for r in results.values()
        ),
        "max_score_rel_err": max(r["score_rel"] for r in results.values()),
        "seconds": round(time.perf_counter() - started, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    args = parser.parse_args()
    runs = [("fused", "cpu"), ("foreach", args.device), ("reference", args.device)]
    if args.device != "cpu":
        runs.insert(1, ("foreach", "cpu"))
    for impl_name, device in runs:
        try:
            line = check(impl_name, device)
        except Exception as err:  # noqa: BLE001 - e.g. no compiler for the kernel: say so, go on
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            line = {
                "check": "exactness",
                "impl": impl_name,
                "device": device,
                "ok": False,
                "error": f"{type(err).__name__}: {first}",
            }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
