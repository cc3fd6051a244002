"""1. Per-step overhead: a training step bare, babysat, and logged with TensorBoard.

Each variant runs in blocks of ``steps`` training steps; blocks of the variants alternate (the
order rotated every round) and every block starts from the same weights. babysit and TensorBoard
each get a fresh run directory / event file per block, and each block's timer stops only after
the tool has drained everything the block logged (``run.writer.flush()``,
``SummaryWriter.flush()``), so no variant's background work leaks into another's block. That
final drain runs on the training thread, which is pessimistic: in a real run it happens on the
tool's own thread. The loop-only time (timer stopped before the drain) is reported too.

The three metrics per step are the same objects for both tools: the loss (a 0-d tensor, not
synchronised by the step) and the lr and momentum read from the optimizer's first param group.
"""

from __future__ import annotations

import shutil
from typing import Any, Callable

import time

from .common import Scratch, Workload, interleave, now_ns, summarize

cpu_ns = time.process_time_ns  # all threads of this process: the tools' background threads count too


def _row(steps: int, t0: int, t1: int, t2: int, c0: int, c2: int) -> dict[str, float]:
    return {"loop": (t1 - t0) / steps / 1e3, "total": (t2 - t0) / steps / 1e3, "cpu": (c2 - c0) / steps / 1e3}


def _tensorboard() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional: pip install -r bench/requirements.txt
        return None
    return SummaryWriter


def _blocks(work: Workload, scratch: Scratch, steps: int, *, loader: Callable[[int], Any] | None,
            metrics: int, with_tb: bool) -> dict[str, Callable[[int], Any]]:
    """The per-block functions of the variants; each returns µs per step: ``loop`` (timer stopped
    when the loop ends), ``total`` (after the tool's drain) and ``cpu`` (process CPU time, all
    threads, incl. the drain)."""
    from babysit import Run

    step = work.step
    group = work.optimizer.param_groups[0]
    mom_key = "momentum" if "momentum" in group else None
    fixed = [work.batches[i % len(work.batches)] for i in range(steps)] if work.batches else None

    def batches() -> Any:
        return fixed if fixed is not None else loader(steps)  # type: ignore[misc]

    def bare(_: int) -> dict[str, float]:
        work.reset()
        data = batches()
        c0, t0 = cpu_ns(), now_ns()
        for b in data:
            step(b)
        t1 = now_ns()
        c1 = cpu_ns()
        return _row(steps, t0, t1, t1, c0, c1)

    def babysit(_: int) -> dict[str, float]:
        work.reset()
        data = batches()
        run_dir = scratch.fresh("run")
        run = Run(run_dir, work.model, work.optimizer, config={"bench": "step_overhead"})
        log = run.log
        c0, t0 = cpu_ns(), now_ns()
        if metrics == 3:
            for b in run.batches(data):
                loss = step(b)
                log(loss=loss, lr=group["lr"], momentum=group[mom_key])
        else:
            for b in run.batches(data):
                log(loss=step(b))
        t1 = now_ns()
        run.writer.flush()
        t2 = now_ns()
        c2 = cpu_ns()
        run.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        return _row(steps, t0, t1, t2, c0, c2)

    variants: dict[str, Callable[[int], Any]] = {"bare": bare, "babysit": babysit}
    SummaryWriter = _tensorboard() if with_tb else None
    if SummaryWriter is not None:
        def tensorboard(_: int) -> dict[str, float]:
            work.reset()
            data = batches()
            log_dir = scratch.fresh("tb")
            writer = SummaryWriter(log_dir=str(log_dir))
            add = writer.add_scalar
            i = 0
            c0, t0 = cpu_ns(), now_ns()
            for b in data:
                loss = step(b)
                i += 1
                add("loss", loss, i)
                add("lr", group["lr"], i)
                add("momentum", group[mom_key], i)
            t1 = now_ns()
            writer.flush()
            t2 = now_ns()
            c2 = cpu_ns()
            writer.close()
            shutil.rmtree(log_dir, ignore_errors=True)
            return _row(steps, t0, t1, t2, c0, c2)

        variants["tensorboard"] = tensorboard
    return variants


def _analyse(raw: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Per variant: µs/step (wall, incl. drain), loop only, process CPU; overheads against the
    bare block of the same round (paired), in µs and % of the bare step."""
    out: dict[str, Any] = {"variants": {}, "raw": raw}
    bare = {key: [r[key] for r in raw["bare"]] for key in ("total", "loop", "cpu")}
    bare_median = summarize(bare["total"])["median"]
    for name, rows in raw.items():
        entry: dict[str, Any] = {
            "us_per_step": summarize([r["total"] for r in rows]),
            "us_per_step_loop_only": summarize([r["loop"] for r in rows]),
            "cpu_us_per_step": summarize([r["cpu"] for r in rows]),
        }
        if name != "bare":
            for key, label in (("total", ""), ("loop", "_loop_only"), ("cpu", "_cpu")):
                paired = [r[key] - b for r, b in zip(rows, bare[key])]
                entry["overhead_us_paired" + label] = summarize(paired)
                entry["overhead_pct_paired" + label] = summarize(
                    [100 * (r[key] - b) / b for r, b in zip(rows, bare[key])])
            entry["overhead_us_of_medians"] = entry["us_per_step"]["median"] - bare_median
            entry["overhead_pct"] = 100 * entry["overhead_us_paired"]["median"] / bare_median
        out["variants"][name] = entry
    variants = out["variants"]
    if "tensorboard" in variants and "babysit" in variants:
        for label in ("", "_loop_only", "_cpu"):
            tb = variants["tensorboard"]["overhead_us_paired" + label]["median"]
            bs = variants["babysit"]["overhead_us_paired" + label]["median"]
            out["babysit_over_tensorboard" + label] = bs / tb if tb > 0 else float("nan")
    return out


def measure_reference(work: Workload, scratch: Scratch, *, steps: int, rounds: int) -> dict[str, Any]:
    variants = _blocks(work, scratch, steps, loader=None, metrics=3, with_tb=True)
    raw = interleave(variants, rounds=rounds, warmup_rounds=1)
    result = _analyse(raw)
    result.update(workload=work.description, steps_per_block=steps, rounds=rounds,
                  tensorboard_installed="tensorboard" in variants)
    return result


def measure_digits(work: Workload, loader: Callable[[int], Any], scratch: Scratch, *, steps: int,
                   rounds: int) -> dict[str, Any]:
    variants = _blocks(work, scratch, steps, loader=loader, metrics=1, with_tb=False)
    raw = interleave(variants, rounds=rounds, warmup_rounds=1)
    result = _analyse(raw)
    result.update(workload=work.description, steps_per_block=steps, rounds=rounds, metrics_logged=["loss"])
    return result


def measure_isolated(scratch: Scratch, *, steps: int, rounds: int) -> dict[str, Any]:
    """The tools' own cost per step with no training at all (the "step" returns a fixed loss):
    the loop alone, babysit's run.batches alone, run.batches + run.log of 3 metrics, and
    TensorBoard's 3 add_scalar calls. Little else happens in these loops, so the numbers are
    steady to a fraction of a microsecond."""
    import torch

    from babysit import Run

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    group = optimizer.param_groups[0]
    loss = torch.tensor(2.3)
    data = list(range(steps))
    SummaryWriter = _tensorboard()

    def bare(_: int) -> dict[str, float]:
        c0, t0 = cpu_ns(), now_ns()
        for _b in data:
            pass
        t1 = now_ns()
        c1 = cpu_ns()
        return _row(steps, t0, t1, t1, c0, c1)

    def with_run(log: bool) -> Callable[[int], dict[str, float]]:
        def block(_: int) -> dict[str, float]:
            run_dir = scratch.fresh("iso")
            run = Run(run_dir, model, optimizer, config={})
            c0, t0 = cpu_ns(), now_ns()
            if log:
                for _b in run.batches(data):
                    run.log(loss=loss, lr=group["lr"], momentum=group["momentum"])
            else:
                for _b in run.batches(data):
                    pass
            t1 = now_ns()
            run.writer.flush()
            t2 = now_ns()
            c2 = cpu_ns()
            run.close()
            shutil.rmtree(run_dir, ignore_errors=True)
            return _row(steps, t0, t1, t2, c0, c2)
        return block

    variants: dict[str, Callable[[int], Any]] = {
        "bare": bare, "babysit_batches_only": with_run(False), "babysit": with_run(True)}
    if SummaryWriter is not None:
        def tensorboard(_: int) -> dict[str, float]:
            log_dir = scratch.fresh("tbiso")
            writer = SummaryWriter(log_dir=str(log_dir))
            add = writer.add_scalar
            c0, t0 = cpu_ns(), now_ns()
            for i in data:
                add("loss", loss, i)
                add("lr", group["lr"], i)
                add("momentum", group["momentum"], i)
            t1 = now_ns()
            writer.flush()
            t2 = now_ns()
            c2 = cpu_ns()
            writer.close()
            shutil.rmtree(log_dir, ignore_errors=True)
            return _row(steps, t0, t1, t2, c0, c2)
        variants["tensorboard"] = tensorboard
    raw = interleave(variants, rounds=rounds, warmup_rounds=1)
    result = _analyse(raw)
    result.update(steps_per_block=steps, rounds=rounds)
    return result
