"""Shared pieces of the benchmark suite: statistics, interleaving, machine facts, workloads.

Every comparison in this suite is made inside one process, with the variants' repetitions
interleaved (round r runs the variants in an order rotated by r), and is reported as the median
and the min–max of the repetitions and as ratios. Absolute times on a shared two-core machine
wander by tens of per cent from one minute to the next; interleaving makes the variants wander
together, so their ratios stay meaningful.
"""

from __future__ import annotations

import math
import os
import platform
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"

# The reference step is timed with torch pinned to this many threads: one core trains, the other
# is left to the logging tool's background thread (babysit's writer, TensorBoard's event writer)
# and to the other processes a laptop or a shared box runs. A small MLP gains nothing from a
# second intra-op thread at this size, and a single thread makes the step far less noisy.
DEFAULT_THREADS = 1

now_ns = time.perf_counter_ns


def mono() -> float:
    """CLOCK_MONOTONIC in seconds: comparable between processes on one Linux machine."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)



def lines_run(files: tuple[str, ...], call: Callable[[], Any]) -> dict[str, int]:
    """How many lines of each of ``files`` run during ``call()`` (Python's trace hook): a count of
    Python-level work that does not depend on the machine's speed (the bench and the tests use it)."""
    counts = dict.fromkeys(files, 0)

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            counts[frame.f_code.co_filename] += 1
        return local

    sys.settrace(lambda frame, event, arg: local if frame.f_code.co_filename in counts else None)
    try:
        call()
    finally:
        sys.settrace(None)
    return counts

# -- statistics ------------------------------------------------------------------------------
def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max, quartiles and count of ``values`` (NaNs dropped)."""
    clean = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not clean:
        return {"n": 0, "median": float("nan"), "min": float("nan"), "max": float("nan"),
                "p25": float("nan"), "p75": float("nan")}
    ordered = sorted(clean)
    quart = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {"n": len(ordered), "median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "p25": quart[0], "p75": quart[2]}


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "–"
    return f"{value:,.{digits}f}"


def fmt_range(s: dict[str, float], digits: int = 1, unit: str = "") -> str:
    """``median (min–max)`` of a summary."""
    return f"{fmt(s['median'], digits)}{unit} ({fmt(s['min'], digits)}–{fmt(s['max'], digits)})"


def interleave(variants: dict[str, Callable[[int], Any]], rounds: int, warmup_rounds: int = 1) -> dict[str, list[Any]]:
    """Run each variant once per round, the order rotated every round; return the results of
    the rounds after the warm-up ones, per variant, in round order (so index i of every variant
    comes from the same round and can be paired)."""
    names = list(variants)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for r in range(warmup_rounds + rounds):
        k = r % len(names)
        order = names[k:] + names[:k]
        if r % 2:
            order.reverse()
        for name in order:
            value = variants[name](r)
            if r >= warmup_rounds:
                results[name].append(value)
    return results


# -- the machine -----------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info(threads: int) -> dict[str, Any]:
    import numpy
    import torch

    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_total = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "memory_gib": mem_total,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "numpy": numpy.__version__,
        "sqlite": sqlite3.sqlite_version,
        "tensorboard": _version("tensorboard"),
        "plotly": _version("plotly"),
        "git_commit": commit,
        "git_dirty": dirty,
        "command": "python " + " ".join(shlex.quote(a) for a in _argv()),
        "load_average_start": load_average(),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def _argv() -> list[str]:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("bench/__main__.py", "bench\\__main__.py")):
        return ["-m", "bench", *argv[1:]]
    return argv


# -- scratch space ---------------------------------------------------------------------------
class Scratch:
    """A temporary directory under the output folder (same disk as a real run directory)."""

    def __init__(self, root: Path, prefix: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        self._n = 0

    def fresh(self, name: str) -> Path:
        self._n += 1
        path = self.path / f"{name}-{self._n}"
        path.mkdir(parents=True)
        return path

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# -- workloads -------------------------------------------------------------------------------
@dataclass
class Workload:
    """A model, its optimizer, a few fixed batches and one training step."""

    name: str
    model: Any
    optimizer: Any
    batches: list[Any]
    step: Callable[[Any], Any]          # one training step on a batch; returns the loss tensor
    description: str
    state_bytes: int = 0
    initial: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        """Put the weights and optimizer state back as they were after warm-up (untimed)."""
        if self.initial:
            self.model.load_state_dict(self.initial["model"])
            self.optimizer.load_state_dict(self.initial["optimizer"])

    def remember(self) -> None:
        from babysit.checkpoint import clone_tree

        self.initial = {"model": clone_tree(self.model.state_dict()),
                        "optimizer": clone_tree(self.optimizer.state_dict())}
        self.state_bytes = tensor_bytes(self.initial)


def tensor_bytes(obj: Any) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# Reference MLP: sized so that one SGD-with-momentum step (forward, cross-entropy, backward,
# optimizer step) takes about 0.5 ms with one torch thread on this class of machine. At this
# size the step is dominated by the ~30 operator dispatches, as small real models on a CPU are.
MLP_IN, MLP_HIDDEN, MLP_OUT, MLP_BATCH = 32, 64, 10, 32


def make_mlp_workload(seed: int = 0, n_batches: int = 16, dims: tuple[int, int, int, int] | None = None,
                      hidden_layers: int = 1) -> Workload:
    import torch
    import torch.nn.functional as F
    from torch import nn

    d_in, hidden, d_out, batch = dims or (MLP_IN, MLP_HIDDEN, MLP_OUT, MLP_BATCH)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(d_in, hidden), nn.ReLU()]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    layers.append(nn.Linear(hidden, d_out))
    model = nn.Sequential(*layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # Random labels: the loss stays near log(10) and never trips babysit's divergence guard.
    batches = [(torch.randn(batch, d_in, generator=gen), torch.randint(0, d_out, (batch,), generator=gen))
               for _ in range(n_batches)]

    def step(b: Any) -> Any:
        x, y = b
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    n_params = sum(p.numel() for p in model.parameters())
    desc = (f"MLP {d_in}→{hidden}" + f"→{hidden}" * (hidden_layers - 1) + f"→{d_out} (ReLU), {n_params:,} parameters, "
            f"batch {batch}, cross-entropy, SGD(lr=0.01, momentum=0.9)")
    work = Workload("mlp", model, optimizer, batches, step, desc)
    for b in batches * 4:
        step(b)
    work.remember()
    return work


def make_big_workload(quick: bool) -> Workload:
    """A model whose weights alone take ≥ 100 MB (float32); SGD momentum doubles the state."""
    if quick:
        return make_mlp_workload(seed=1, n_batches=2, dims=(256, 1024, 10, 8), hidden_layers=2)
    return make_mlp_workload(seed=1, n_batches=2, dims=(2048, 4096, 10, 8), hidden_layers=2)


def make_digits_workload(batch_size: int = 32) -> tuple[Workload, Any]:
    """The demo job's model, optimizer, augmentation and step (babysit/jobs/digits.py).

    Returns the workload and a function ``loader(n_steps)`` building the demo's DataLoader
    (RandomSampler over the training images) for ``n_steps`` batches.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, RandomSampler

    from babysit.jobs.digits import DigitsConfig, augment, build_model, build_optimizer, load_digits_split

    config = DigitsConfig(batch_size=batch_size)
    torch.manual_seed(config.seed)
    train_data, _ = load_digits_split(config.seed)
    model = build_model()
    optimizer = build_optimizer(config, model)

    def step(b: Any) -> Any:
        images, labels = b
        loss = F.cross_entropy(model(augment(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def loader(n_steps: int) -> Any:
        sampler = RandomSampler(train_data, num_samples=n_steps * config.batch_size)
        return DataLoader(train_data, batch_size=config.batch_size, sampler=sampler)

    n_params = sum(p.numel() for p in model.parameters())
    work = Workload("digits", model, optimizer, [], step,
                    f"demo job (babysit/jobs/digits.py): CNN with {n_params:,} parameters, batch {config.batch_size}, "
                    f"augment() + cross-entropy + SGD(lr={config.lr}, momentum={config.momentum}), DataLoader with "
                    "RandomSampler")
    for b in loader(20):
        step(b)
    work.remember()
    return work, loader


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
