"""1. Per-step overhead: a training step bare, babysat, and logged with TensorBoard.

Each variant runs in blocks of ``steps`` training steps; blocks of the variants alternate (the
order rotated every round) and every block starts from the same weights. Each tool is set up
once and warmed up (one babysit ``Run``, one ``SummaryWriter``), as in a real run, so a block
pays the steady-state per-step cost, not the first writes of a new run.

No tool's work may leak into another variant's block, so babysit's writer thread is kept asleep
(``flush_interval`` of an hour) and each babysit block ends with ``run.writer.flush()``: exactly
the one flush (chunks + heartbeat, one transaction) that the writer thread performs every 0.25 s,
about once per 500-step block. That flush is timed on the training thread, which is pessimistic:
in a real run it happens on the writer's own thread, overlapping the step except where the two
contend for the GIL. TensorBoard's ``SummaryWriter.flush()`` ends its blocks the same way. So
"loop only" is a lower bound of a tool's cost and "incl. drain" an upper bound.

The machine is shared and its load comes in bursts, so besides block totals the benchmark times
every step and uses each block's median step (plus the block's drain, per step) as its
"typical step": a burst that slows a few steps of a block does not move it. Overheads are paired:
each block minus the bare block of the same round.

The three metrics per step are the same objects for both tools: the loss (a 0-d tensor, not
synchronised by the step) and the lr and momentum read from the optimizer's first param group.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from .common import Scratch, Workload, interleave, now_ns, summarize

cpu_ns = time.process_time_ns  # all threads of this process: the tools' background threads count too
ASLEEP_S = 3600.0


def _row(steps: int, t0: int, t1: int, t2: int, c0: int, c2: int, marks: list[int] | None = None) -> dict[str, float]:
    """µs per step of a block: ``loop`` (until the loop ended), ``total`` (after the drain),
    ``cpu`` (process CPU, all threads), ``typical`` (median step + drain per step)."""
    row = {"loop": (t1 - t0) / steps / 1e3, "total": (t2 - t0) / steps / 1e3, "cpu": (c2 - c0) / steps / 1e3}
    if marks:
        marks.append(t1)
        gaps = sorted(b - a for a, b in zip(marks, marks[1:]))
        row["typical"] = (gaps[len(gaps) // 2] + (t2 - t1) / steps) / 1e3
    else:
        row["typical"] = row["total"]
    return row


def _tensorboard() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional: pip install -r bench/requirements.txt
        return None
    return SummaryWriter


class Babysat:
    """One babysit Run kept for all the blocks of a measurement; its writer thread asleep, the
    block's own code flushes it (see the module docstring)."""

    def __init__(self, scratch: Scratch, model: Any, optimizer: Any, patch: Any = None) -> None:
        import types

        from babysit import Run

        self.run = Run(scratch.fresh("run"), model, optimizer, config={"bench": "step_overhead"},
                       flush_interval=ASLEEP_S)
        if patch is not None:
            self.run.writer._flush_locked = types.MethodType(patch, self.run.writer)

    def close(self) -> None:
        self.run.close()


def babysit_block(tool: Babysat, data: Any, step: Callable[[Any], Any], steps: int, log3: Callable[[Any, Any], None] | None
                  ) -> dict[str, float]:
    run = tool.run
    marks: list[int] = []
    mark = marks.append
    c0, t0 = cpu_ns(), now_ns()
    if log3 is not None:
        for b in run.batches(data):
            mark(now_ns())
            log3(run, step(b))
    else:
        for b in run.batches(data):
            mark(now_ns())
            run.log(loss=step(b))
    t1 = now_ns()
    run.writer.flush()
    t2 = now_ns()
    c2 = cpu_ns()
    return _row(steps, t0, t1, t2, c0, c2, marks)


def _blocks(work: Workload, scratch: Scratch, steps: int, *, loader: Callable[[int], Any] | None,
            metrics: int, with_tb: bool, tools: list[Any]) -> dict[str, Callable[[int], Any]]:
    """The per-block functions of the variants; each returns µs per step: ``loop`` (timer stopped
    when the loop ends), ``total`` (after the tool's drain) and ``cpu`` (process CPU time, all
    threads, incl. the drain)."""
    step = work.step
    group = work.optimizer.param_groups[0]
    fixed = [work.batches[i % len(work.batches)] for i in range(steps)] if work.batches else None

    def batches() -> Any:
        return fixed if fixed is not None else loader(steps)  # type: ignore[misc]

    def log3(run: Any, loss: Any) -> None:
        run.log(loss=loss, lr=group["lr"], momentum=group["momentum"])

    def bare(_: int) -> dict[str, float]:
        work.reset()
        data = batches()
        marks: list[int] = []
        mark = marks.append
        c0, t0 = cpu_ns(), now_ns()
        for b in data:
            mark(now_ns())
            step(b)
        t1 = now_ns()
        c1 = cpu_ns()
        return _row(steps, t0, t1, t1, c0, c1, marks)

    babysat = Babysat(scratch, work.model, work.optimizer)
    tools.append(babysat)

    def babysit(_: int) -> dict[str, float]:
        work.reset()
        return babysit_block(babysat, batches(), step, steps, log3 if metrics == 3 else None)

    variants: dict[str, Callable[[int], Any]] = {"bare": bare, "babysit": babysit}
    SummaryWriter = _tensorboard() if with_tb else None
    if SummaryWriter is not None:
        writer = SummaryWriter(log_dir=str(scratch.fresh("tb")))
        tools.append(writer)
        counter = [0]

        def tensorboard(_: int) -> dict[str, float]:
            work.reset()
            data = batches()
            add = writer.add_scalar
            i = counter[0]
            marks: list[int] = []
            mark = marks.append
            c0, t0 = cpu_ns(), now_ns()
            for b in data:
                mark(now_ns())
                loss = step(b)
                i += 1
                add("loss", loss, i)
                add("lr", group["lr"], i)
                add("momentum", group["momentum"], i)
            t1 = now_ns()
            writer.flush()
            t2 = now_ns()
            c2 = cpu_ns()
            counter[0] = i
            return _row(steps, t0, t1, t2, c0, c2, marks)

        variants["tensorboard"] = tensorboard
    return variants


def _close(tools: list[Any]) -> None:
    for tool in tools:
        tool.close()


def _analyse(raw: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Per variant: µs/step (wall, incl. drain), loop only, process CPU; overheads against the
    bare block of the same round (paired), in µs and % of the bare step; and, as a check that is
    robust to bursts of load from other processes, the difference of the fastest quarter
    (25th percentiles) of the blocks."""
    out: dict[str, Any] = {"variants": {}, "raw": raw}
    bare = {key: [r[key] for r in raw["bare"]] for key in ("total", "loop", "cpu", "typical")}
    bare_s = summarize(bare["total"])
    for name, rows in raw.items():
        entry: dict[str, Any] = {
            "us_per_step": summarize([r["total"] for r in rows]),
            "us_per_step_loop_only": summarize([r["loop"] for r in rows]),
            "cpu_us_per_step": summarize([r["cpu"] for r in rows]),
            "typical_us_per_step": summarize([r["typical"] for r in rows]),
        }
        if name != "bare":
            for key, label in (("total", ""), ("loop", "_loop_only"), ("cpu", "_cpu"), ("typical", "_typical")):
                paired = [r[key] - b for r, b in zip(rows, bare[key])]
                entry["overhead_us_paired" + label] = summarize(paired)
                entry["overhead_pct_paired" + label] = summarize(
                    [100 * (r[key] - b) / b for r, b in zip(rows, bare[key])])
            entry["overhead_us_of_medians"] = entry["us_per_step"]["median"] - bare_s["median"]
            entry["overhead_us_of_p25"] = entry["us_per_step"]["p25"] - bare_s["p25"]
            entry["overhead_pct"] = 100 * entry["overhead_us_paired"]["median"] / bare_s["median"]
            entry["overhead_pct_typical"] = (100 * entry["overhead_us_paired_typical"]["median"]
                                             / summarize(bare["typical"])["median"])
            # The typical-step overhead in its two parts: the drain per step, and how much the
            # block's median step grew (the training thread's direct cost, plus any slowdown of the
            # step itself).
            drain = [r["total"] - r["loop"] for r in rows]
            entry["drain_us_per_step"] = summarize(drain)
            entry["median_step_growth_us_paired"] = summarize(
                [(r["typical"] - d) - b for r, d, b in zip(rows, drain, bare["typical"])])
        out["variants"][name] = entry
    variants = out["variants"]
    if "tensorboard" in variants and "babysit" in variants:
        for label in ("", "_loop_only", "_cpu", "_typical"):
            tb = variants["tensorboard"]["overhead_us_paired" + label]["median"]
            bs = variants["babysit"]["overhead_us_paired" + label]["median"]
            out["babysit_over_tensorboard" + label] = bs / tb if tb > 0 else float("nan")
        tb25 = variants["tensorboard"]["overhead_us_of_p25"]
        out["babysit_over_tensorboard_p25"] = variants["babysit"]["overhead_us_of_p25"] / tb25 if tb25 > 0 else float("nan")
    return out


def measure_reference(work: Workload, scratch: Scratch, *, steps: int, rounds: int) -> dict[str, Any]:
    tools: list[Any] = []
    try:
        variants = _blocks(work, scratch, steps, loader=None, metrics=3, with_tb=True, tools=tools)
        raw = interleave(variants, rounds=rounds, warmup_rounds=1)
    finally:
        _close(tools)
    result = _analyse(raw)
    result.update(workload=work.description, steps_per_block=steps, rounds=rounds,
                  tensorboard_installed="tensorboard" in variants)
    return result


def measure_digits(work: Workload, loader: Callable[[int], Any], scratch: Scratch, *, steps: int,
                   rounds: int) -> dict[str, Any]:
    tools: list[Any] = []
    try:
        variants = _blocks(work, scratch, steps, loader=loader, metrics=1, with_tb=False, tools=tools)
        raw = interleave(variants, rounds=rounds, warmup_rounds=1)
    finally:
        _close(tools)
    result = _analyse(raw)
    result.update(workload=work.description, steps_per_block=steps, rounds=rounds, metrics_logged=["loss"])
    return result


def measure_isolated(scratch: Scratch, *, steps: int, rounds: int) -> dict[str, Any]:
    """The tools' own cost per step with no training at all (the "step" returns a fixed loss):
    the loop alone, babysit's run.batches alone, run.batches + run.log of 3 metrics, and
    TensorBoard's 3 add_scalar calls. Little else happens in these loops, so the numbers are
    steady to a fraction of a microsecond."""
    import torch

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    group = optimizer.param_groups[0]
    loss = torch.tensor(2.3)
    data = list(range(steps))
    SummaryWriter = _tensorboard()
    tools: list[Any] = []

    def bare(_: int) -> dict[str, float]:
        c0, t0 = cpu_ns(), now_ns()
        for _b in data:
            pass
        t1 = now_ns()
        c1 = cpu_ns()
        return _row(steps, t0, t1, t1, c0, c1)

    def log3(run: Any, _: Any) -> None:
        run.log(loss=loss, lr=group["lr"], momentum=group["momentum"])

    def with_run(log: bool) -> Callable[[int], dict[str, float]]:
        tool = Babysat(scratch, model, optimizer)
        tools.append(tool)

        def block(_: int) -> dict[str, float]:
            run = tool.run
            c0, t0 = cpu_ns(), now_ns()
            if log:
                for _b in run.batches(data):
                    log3(run, None)
            else:
                for _b in run.batches(data):
                    pass
            t1 = now_ns()
            run.writer.flush()
            t2 = now_ns()
            c2 = cpu_ns()
            return _row(steps, t0, t1, t2, c0, c2)
        return block

    try:
        variants: dict[str, Callable[[int], Any]] = {
            "bare": bare, "babysit_batches_only": with_run(False), "babysit": with_run(True)}
        if SummaryWriter is not None:
            writer = SummaryWriter(log_dir=str(scratch.fresh("tbiso")))
            tools.append(writer)

            def tensorboard(r: int) -> dict[str, float]:
                add = writer.add_scalar
                base = r * steps
                c0, t0 = cpu_ns(), now_ns()
                for i in data:
                    add("loss", loss, base + i)
                    add("lr", group["lr"], base + i)
                    add("momentum", group["momentum"], base + i)
                t1 = now_ns()
                writer.flush()
                t2 = now_ns()
                c2 = cpu_ns()
                return _row(steps, t0, t1, t2, c0, c2)
            variants["tensorboard"] = tensorboard
        raw = interleave(variants, rounds=rounds, warmup_rounds=1)
    finally:
        _close(tools)
    result = _analyse(raw)
    result.update(steps_per_block=steps, rounds=rounds)
    return result
