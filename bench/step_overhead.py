"""1. Per-step overhead: a training step bare, babysat, and logged with TensorBoard.

**Whole loops** (:func:`measure_whole_loop`, the figure the targets use) measure what a user pays:
a loop of ``steps`` training steps timed from its first batch until the tool has stored the
block's values, divided by the steps (a mean, so the writer's bursts count in full), with
babysit's writer thread running at its default pace, as in a real run. Variants are paired per
round, the order shuffled every round, for 1 and 2 torch threads; overheads are medians of the
per-round differences and ratios. The median step inside the loop is kept as a secondary figure:
it cannot see the writer's bursts, which land on a few steps.

**Blocks with a sleeping writer** (:func:`measure_reference`, the earlier method) follow. Each variant runs in blocks of ``steps`` training steps; blocks of the variants alternate (the
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

import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .common import Scratch, Workload, interleave, lines_run, now_ns, summarize

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


# -- whole loops -----------------------------------------------------------------------------
WHOLE_LOOP_SEED = 15
WHOLE_LOOP_MLP = (64, 256, 10, 64)  # in, hidden, out, batch: a fast step (~0.5-0.9 ms on one core)
# Distinct random-labelled batches: the loss stays near log(10). With a few batches repeated, this
# MLP learns them by heart within a block (2.1 -> 0.03), and the next block, back at the starting
# weights, is a 70x jump that the guard rightly calls a divergence.
WHOLE_LOOP_BATCHES = 500


def whole_loop_workload() -> Workload:
    """The fast step of the whole-loop measurement, with a loss that never trips the guard."""
    import torch

    from .common import make_mlp_workload

    d_in, _, d_out, batch = WHOLE_LOOP_MLP
    work = make_mlp_workload(seed=2, dims=WHOLE_LOOP_MLP)
    gen = torch.Generator().manual_seed(3)
    work.batches = [(torch.randn(batch, d_in, generator=gen), torch.randint(0, d_out, (batch,), generator=gen))
                    for _ in range(WHOLE_LOOP_BATCHES)]
    return work
DRAIN_SETTLE_S = 0.05  # between blocks: lets a parked writer thread fall asleep before the next block


def package_at(rev: str) -> Any:
    """The whole ``babysit`` package as it was at git revision ``rev``, imported beside the current
    one (as ``babysit_at_<rev>``: its modules import each other relatively), so one process can
    time the code before and after a change in the same paired rounds."""
    import atexit
    import importlib.util
    import io
    import re
    import shutil
    import subprocess
    import tarfile
    import tempfile

    from .common import REPO

    name = "babysit_at_" + re.sub(r"\W", "_", rev)
    if name in sys.modules:
        return sys.modules[name]
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "babysit"], cwd=REPO, capture_output=True,
                             check=True).stdout
    root = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # its modules may import more until then
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    folder = root / "babysit"
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    try:
        spec.loader.exec_module(package)
        for module in ("run", "guard", "writer"):
            importlib.import_module(f"{name}.{module}")
    except BaseException:  # no half-imported package left for a later call to find
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[loaded]
        raise
    return package


class LiveBabysat:
    """One babysit Run whose writer thread runs at its own pace during a block and sleeps between
    blocks, so no variant's block pays for another's values. ``package``: babysit as it was at
    another revision (:func:`package_at`), to build the Run from instead of the current one."""

    def __init__(self, scratch: Scratch, model: Any, optimizer: Any, guard: Any = None, package: Any = None) -> None:
        import babysit

        package = package or babysit
        if guard is not None:
            guard = package.GuardConfig(**{f: getattr(guard, f) for f in guard.__dataclass_fields__})
        self.run = package.Run(scratch.fresh("live"), model, optimizer, config={"bench": "whole_loop"}, guard=guard)
        self.interval = self.run.writer._interval
        # The guard judges every value as usual, but a divergence must not pause the run (the
        # bench would wait forever): it is recorded, and the block that saw it fails.
        self.divergences: list[Any] = []
        self.run.writer._on_divergence = lambda found, branch: self.divergences.append(found)
        self.park()

    def check(self) -> None:
        if self.divergences:
            raise RuntimeError(f"the bench's loss tripped the divergence guard ({self.divergences[0].describe()}); "
                               "the measurement would not be of a healthy run")

    def park(self) -> None:
        self.run.writer._interval = ASLEEP_S
        self.run.writer.wake()

    def unpark(self) -> None:
        self.run.writer._interval = self.interval
        self.run.writer.wake()

    def close(self) -> None:
        self.unpark()
        self.run.close()


def _loop_row(steps: int, t0: int, t1: int, t2: int, marks: list[int]) -> dict[str, float]:
    """µs per step of one whole loop: ``mean`` (until the tool stored the block's values),
    ``loop`` (until the last step ended) and ``median_step`` (the in-loop median)."""
    marks.append(t1)
    gaps = sorted(b - a for a, b in zip(marks, marks[1:]))
    return {"mean": (t2 - t0) / steps / 1e3, "loop": (t1 - t0) / steps / 1e3,
            "median_step": gaps[len(gaps) // 2] / 1e3}


def _whole_loop_variants(work: Workload, scratch: Scratch, steps: int, tools: list[Any], compare: str | None = None
                         ) -> dict[str, Callable[[], dict[str, float]]]:
    from babysit import GuardConfig

    step = work.step
    data = [work.batches[i % len(work.batches)] for i in range(steps)]

    def bare() -> dict[str, float]:
        marks: list[int] = []
        mark = marks.append
        t0 = now_ns()
        for b in data:
            mark(now_ns())
            step(b)
        t1 = now_ns()
        return _loop_row(steps, t0, t1, t1, marks)

    def babysat(guard: Any, package: Any = None) -> Callable[[], dict[str, float]]:
        tool = LiveBabysat(scratch, work.model, work.optimizer, guard, package)
        tools.append(tool)
        run = tool.run

        def block() -> dict[str, float]:
            marks: list[int] = []
            mark = marks.append
            tool.unpark()
            t0 = now_ns()
            for b in run.batches(data):
                mark(now_ns())
                run.log(loss=step(b))
            t1 = now_ns()
            run.writer.flush()  # the values the writer thread had not stored yet
            t2 = now_ns()
            tool.park()
            tool.check()
            return _loop_row(steps, t0, t1, t2, marks)
        return block

    kept: list[Any] = []

    def least_logger() -> dict[str, float]:
        # The least any in-process logger does per step: one call that reads the value
        # (``.item()``) and keeps it. What babysit costs beyond it is babysit's own.
        keep = kept.append

        def log(**metrics: Any) -> None:
            keep(metrics["loss"].item())

        marks: list[int] = []
        mark = marks.append
        t0 = now_ns()
        for b in data:
            mark(now_ns())
            log(loss=step(b))
        t1 = now_ns()
        kept.clear()
        return _loop_row(steps, t0, t1, t1, marks)

    variants = {"bare": bare, "least_logger": least_logger, "babysit": babysat(None),
                "babysit_guard_off": babysat(GuardConfig(enabled=False))}
    if compare is not None:  # the same loop with babysit as it was at another revision
        variants["babysit_at_rev"] = babysat(None, package_at(compare))
    SummaryWriter = _tensorboard()
    if SummaryWriter is not None:
        writer = SummaryWriter(log_dir=str(scratch.fresh("tb-loop")))
        tools.append(writer)
        counter = [0]

        def tensorboard() -> dict[str, float]:
            add = writer.add_scalar
            i = counter[0]
            marks: list[int] = []
            mark = marks.append
            t0 = now_ns()
            for b in data:
                mark(now_ns())
                i += 1
                add("loss", step(b), i)
            t1 = now_ns()
            writer.flush()
            t2 = now_ns()
            counter[0] = i
            return _loop_row(steps, t0, t1, t2, marks)

        variants["tensorboard"] = tensorboard
    return variants


def _shuffled_rounds(variants: dict[str, Callable[[], dict[str, float]]], work: Workload, rounds: int,
                     rng: random.Random) -> dict[str, list[dict[str, float]]]:
    """One block per variant per round, in a fresh random order each round (one warm-up round
    first); every block starts from the same weights."""
    raw: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for r in range(1 + rounds):
        order = list(variants)
        rng.shuffle(order)
        for name in order:
            work.reset()
            row = variants[name]()
            if r:
                raw[name].append(row)
            time.sleep(DRAIN_SETTLE_S)
    return raw


def _analyse_whole_loop(raw: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Per variant and per figure (``mean``, ``loop``, ``median_step``): µs per step, and against
    the bare block of the same round the overhead in µs and in % (medians of per-round values)."""
    bare = raw["bare"]
    out: dict[str, Any] = {}
    for name, rows in raw.items():
        entry: dict[str, Any] = {}
        for key in ("mean", "loop", "median_step"):
            entry[key] = {"us_per_step": summarize([r[key] for r in rows])}
            if name != "bare":
                entry[key]["overhead_us"] = summarize([r[key] - b[key] for r, b in zip(rows, bare)])
                entry[key]["overhead_pct"] = summarize([100 * (r[key] / b[key] - 1) for r, b in zip(rows, bare)])
        out[name] = entry
    if "tensorboard" in raw:
        tb = raw["tensorboard"]
        for name in raw:
            if name in ("bare", "tensorboard"):
                continue
            ratios = {}
            for key in ("mean", "loop", "median_step"):
                own = out[name][key]["overhead_us"]["median"]
                theirs = out["tensorboard"][key]["overhead_us"]["median"]
                ratios[key] = {
                    "of_medians": own / theirs if theirs > 0 else float("nan"),
                    "per_round": summarize([(r[key] - b[key]) / (t[key] - b[key]) for r, t, b in
                                            zip(raw[name], tb, bare) if t[key] - b[key] > 0]),
                }
            out[name]["over_tensorboard"] = ratios
    return out


def measure_whole_loop(work: Workload, scratch: Scratch, *, steps: int, rounds: int,
                       threads: tuple[int, ...] = (1, 2), compare: str | None = None) -> dict[str, Any]:
    """Whole-loop µs per step of the bare loop, babysit (default guard, and guard off, to show the
    guard's share) and TensorBoard, logging the loss every step; for each torch thread count.
    ``compare``: a git revision whose babysit runs as one more variant (before → after)."""
    import torch

    before = torch.get_num_threads()
    rng = random.Random(WHOLE_LOOP_SEED)
    tools: list[Any] = []
    by_threads: dict[str, Any] = {}
    try:
        variants = _whole_loop_variants(work, scratch, steps, tools, compare)
        for n in threads:
            torch.set_num_threads(n)
            raw = _shuffled_rounds(variants, work, rounds, rng)
            by_threads[str(n)] = {"variants": _analyse_whole_loop(raw), "raw": raw}
    finally:
        torch.set_num_threads(before)
        _close(tools)
    return {"workload": work.description, "steps_per_block": steps, "rounds": rounds, "threads": list(threads),
            "logged": ["loss"], "by_threads": by_threads, "tensorboard_installed": _tensorboard() is not None,
            "compare_rev": compare}


def _writers_guard(guard_mod: Any, on: bool) -> tuple[Any, tuple[str, ...]]:
    """The guard a writer of ``guard_mod``'s package takes (a revision before guard_watch.py took
    the guard itself), and the files whose lines count as the guard's."""
    import importlib

    config = guard_mod.GuardConfig(enabled=on)
    try:
        watch_mod = importlib.import_module(f"{guard_mod.__package__}.guard_watch")
    except ModuleNotFoundError:
        return guard_mod.DivergenceGuard(config), (guard_mod.__file__,)
    return watch_mod.WatchedGuards(config), (guard_mod.__file__, watch_mod.__file__)


def measure_flush_cost(*, sizes: tuple[int, ...] = (100, 500, 2_000), reps: int = 60, compare: str | None = None
                       ) -> dict[str, Any]:
    """What one writer flush of n logged losses costs, without the machine's noise: the Python lines
    it runs in writer.py and guard.py, its C-level calls, its thread CPU time, and the part of that
    spent outside SQLite calls and ``os.stat`` (which release the GIL): an estimate of how long the
    training thread waits for it. Guard on and off; with ``compare``, the same for the guard and
    writer of that revision, all interleaved."""
    import collections
    import statistics
    import tempfile

    from babysit import guard as guard_now, writer as writer_now
    from babysit.store import PER_STEP, RunStore

    codes = {}
    if compare is not None:
        before = package_at(compare)
        codes[compare] = (before.guard, before.writer)
    codes["now"] = (guard_now, writer_now)
    thread_ns = time.thread_time_ns
    rng = random.Random(WHOLE_LOOP_SEED)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        writers = {}
        for label, (guard_mod, writer_mod) in codes.items():
            for on in (True, False):
                store = RunStore(Path(scratch) / f"{label}-{on}", create=True)
                guard, guard_files = _writers_guard(guard_mod, on)
                writer = writer_mod.MetricsWriter(store, status=lambda: {"state": "running", "step": 1}, guard=guard,
                                                  interval=ASLEEP_S)
                writers[f"{label}, guard {'on' if on else 'off'}"] = (writer, store, (writer_mod.__file__, *guard_files))
        step = 0
        for n in sizes:
            losses = [rng.uniform(0.9, 1.1) for _ in range(n)]
            samples: dict[str, dict[str, Any]] = collections.defaultdict(lambda: collections.defaultdict(list))
            for rep in range(3 + 2 * reps):
                for name in rng.sample(list(writers), len(writers)):
                    writer, _, files = writers[name]
                    for loss in losses:
                        step += 1
                        writer.queue.append((PER_STEP, 1, step, 1000.0 + step, {"loss": loss}))
                    if rep == 0:  # warm-up: the guard past its warm-up, the series known to the store
                        writer.flush()
                    elif rep == 1:
                        samples[name]["lines"] = lines_run(files, writer.flush)
                    elif rep == 2:
                        samples[name]["c_calls"] = _c_calls_and_release_time(writer.flush)[0]
                    elif rep % 2:
                        samples[name]["released_us"].append(_c_calls_and_release_time(writer.flush)[1] / 1e3)
                    else:
                        c0 = thread_ns()
                        writer.flush()
                        samples[name]["cpu_us"].append((thread_ns() - c0) / 1e3)
            for name in writers:
                got = samples[name]
                writer_file, *guard_files = writers[name][2]
                cpu, released = statistics.median(got["cpu_us"]), statistics.median(got["released_us"])
                out.setdefault(name, {})[str(n)] = {
                    "lines_writer": got["lines"][writer_file], "lines_guard": sum(got["lines"][f] for f in guard_files),
                    "c_calls": got["c_calls"], "cpu_us": cpu, "released_us": released, "gil_held_us": cpu - released}
        for writer, store, _ in writers.values():
            writer.close()
            store.close()
    return out


_RELEASE_GIL = frozenset({"execute", "executemany", "stat"})  # SQLite's steps and os.stat run without the GIL


def _c_calls_and_release_time(call: Callable[[], Any]) -> tuple[int, int]:
    """C-level calls made during ``call()``, and the thread CPU ns spent inside the GIL-releasing ones."""
    thread_ns = time.thread_time_ns
    state = [0, 0, 0]  # calls, ns inside, start

    def hook(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call":
            state[0] += 1
            if getattr(arg, "__name__", "") in _RELEASE_GIL:
                state[2] = thread_ns()
        elif event in ("c_return", "c_exception") and getattr(arg, "__name__", "") in _RELEASE_GIL:
            state[1] += thread_ns() - state[2]

    sys.setprofile(hook)
    try:
        call()
    finally:
        sys.setprofile(None)
    return state[0], state[1]


def flush_cost_text(cost: dict[str, Any]) -> str:
    rows = []
    for name, by_n in cost.items():
        for n, c in by_n.items():
            rows.append(f"| {name} | {int(n):,} | {c['lines_writer']:,} ({c['lines_writer'] / int(n):.2f}) | "
                        f"{c['lines_guard']:,} ({c['lines_guard'] / int(n):.2f}) | {c['c_calls']:,} ({c['c_calls'] / int(n):.2f}) | "
                        f"{c['cpu_us']:,.0f} | {c['gil_held_us']:,.0f} |")
    return "\n".join(["| code | values per flush | lines in writer.py (per value) | lines in guard.py (per value) | "
                      "C calls (per value) | writer CPU µs | of which GIL held, µs |", "|---|---|---|---|---|---|---|", *rows])


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.step_overhead``: the whole-loop measurement alone (the step targets'
    figures), printed as RESULTS.md's tables; raw numbers in bench/out/whole-loop-<time>.json."""
    import argparse
    import json

    from . import report
    from .common import BENCH_DIR, load_average, machine_info

    parser = argparse.ArgumentParser(prog="python -m bench.step_overhead", description=main.__doc__)
    parser.add_argument("--steps", type=int, default=2_000, help="steps per loop (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=15, help="paired rounds per thread count (default %(default)s)")
    parser.add_argument("--threads", default="1,2", help="torch thread counts (default %(default)s)")
    parser.add_argument("--compare", metavar="REV", help="also time the babysit package of this git revision, "
                        "in the same paired rounds (before → after)")
    parser.add_argument("--flush-cost", action="store_true", help="instead of whole loops: what one writer flush "
                        "costs (lines, C calls, CPU, GIL held), with --compare for the code before")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="raw results and scratch (git-ignored)")
    args = parser.parse_args(argv)
    if args.flush_cost:
        print(flush_cost_text(measure_flush_cost(compare=args.compare)))
        return 0
    threads = tuple(int(t) for t in args.threads.split(","))
    if args.steps < 2 or args.rounds < 1 or min(threads) < 1:
        parser.error(f"--steps must be >= 2, --rounds and --threads >= 1; got {args.steps}, {args.rounds}, {args.threads}")
    machine = machine_info(threads[0])
    machine["command"] = "python -m bench.step_overhead " + " ".join(sys.argv[1:] if argv is None else argv)
    scratch = Scratch(args.out, "loop-")
    try:
        loop = measure_whole_loop(whole_loop_workload(), scratch, steps=args.steps, rounds=args.rounds, threads=threads,
                                  compare=args.compare)
    finally:
        scratch.cleanup()
    machine["load_average_end"] = load_average()
    results = {"mode": "whole_loop", "machine": machine, "sections": {"step": {"whole_loop": loop}}}
    raw_path = args.out / f"whole-loop-{time.strftime('%Y%m%d-%H%M%S')}.json"
    raw_path.write_text(json.dumps(results, indent=1, default=float))
    print(f"`{machine['command']}` at `{machine['git_commit'][:12]}`, {machine['started_utc']} UTC, load average "
          f"{machine['load_average_start']} → {machine['load_average_end']}; raw: {raw_path}\n")
    print(report.whole_loop_text(loop))
    print(report.targets_text(report.evaluate_targets(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
