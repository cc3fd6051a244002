"""Checks of babysit's CUDA paths, for a machine with a GPU (python -m bench.gpu_check OUT.json).

1. Resume on the GPU: a CUDA job stopped after 2 epochs and resumed to 4 ends with the same weights
   as one that ran 4 epochs straight (deterministic algorithms on).
2. A rollback on the GPU restores exactly the checkpoint's weights, on the GPU.
3. No per-step synchronisation: a loop of asynchronous GPU steps, bare vs with babysit logging the
   loss tensor, interleaved blocks, median µs per step.
4. Checkpoint stall for a ~400 MB model on the GPU: the training thread's snapshot (a copy on the
   GPU) vs a synchronous torch.save of the same state vs a device-to-device copy.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import babysit  # noqa: E402
from babysit import commands as cmd  # noqa: E402
from babysit.checkpoint import KEY_MODEL, clone_tree, read_verified, rng_state  # noqa: E402

DEVICE = "cuda"


def job(run_dir: Path, epochs: int, on_step=None) -> nn.Module:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    x = torch.randn(4096, 64, device=DEVICE)
    y = (x[:, :8].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 2)).to(DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [(x[i:i + 128], y[i:i + 128]) for i in range(0, 4096, 128)]
    run = babysit.Run(run_dir, model, optimizer, config={"device": DEVICE})
    for _epoch in run.epochs(epochs):
        for xb, yb in run.batches(batches):
            loss = nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.log(loss=loss)
            if on_step:
                on_step(run)
        run.log_epoch(val_loss=loss.detach())
    run.close()
    return model


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def check_resume(work: Path) -> dict:
    straight = job(work / "straight", 4)
    job(work / "resumed", 2)
    resumed = job(work / "resumed", 4)
    return {"resume_identical_on_gpu": same_weights(straight, resumed),
            "weights_device": str(next(resumed.parameters()).device)}


def check_rollback(work: Path) -> dict:
    seen = {}

    def on_step(run):
        if run.branch == 1 and run.step == 70:
            run.checkpointer.wait()
            run.store.enqueue_command(cmd.ROLLBACK, {"checkpoint": 1}, source="gpu-check")
        if run.branch == 2 and "first" not in seen:
            seen["first"] = run.step

    model = job(work / "rollback", 3, on_step)
    from babysit.store import RunStore

    store = RunStore(work / "rollback")
    first = store.checkpoints()[0]
    state = read_verified(work / "rollback" / first["file"], first["sha256"])
    return {"rollback_branch_first_step": seen.get("first"), "rollback_checkpoint_step": first["step"],
            "rollback_checkpoint_on_cpu_file": all(t.device.type == "cpu" for t in state[KEY_MODEL].values()),
            "rollback_model_still_on_gpu": str(next(model.parameters()).device)}


def check_no_sync(work: Path, blocks: int = 20, steps: int = 200) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)]).to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(256, 1024, device=DEVICE)

    def step() -> torch.Tensor:
        loss = model(x).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    run = babysit.Run(work / "nosync", model, optimizer)
    epochs = run.epochs(10**6)
    next(epochs)
    batches = run.batches(range(10**9))
    bare, with_babysit = [], []
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        bare.append((time.perf_counter() - start) / steps * 1e6)
        start = time.perf_counter()
        for _ in range(steps):
            next(batches)
            loss = step()
            run.log(loss=loss, a=loss, b=loss)
        torch.cuda.synchronize()
        with_babysit.append((time.perf_counter() - start) / steps * 1e6)
    run.close()
    return {"gpu_step_bare_us_median": statistics.median(bare),
            "gpu_step_babysit_us_median": statistics.median(with_babysit),
            "gpu_overhead_pct": 100 * (statistics.median(with_babysit) / statistics.median(bare) - 1)}


def check_stall(work: Path, repeats: int = 5) -> dict:
    model = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(6)]).to(DEVICE)  # ~400 MB of weights
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model(torch.randn(8, 4096, device=DEVICE)).sum().backward()
    optimizer.step()  # momentum buffers exist: state ~800 MB in all
    results = {"snapshot": [], "copy": [], "save": []}
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        snap = {"model": clone_tree(model.state_dict()), "optimizer": clone_tree(optimizer.state_dict()), "rng": rng_state()}
        results["snapshot"].append(time.perf_counter() - start)  # what the training thread waits for
        torch.cuda.synchronize()
        del snap
        start = time.perf_counter()
        copy = [p.detach().clone() for p in model.state_dict().values()]
        copy += [s["momentum_buffer"].clone() for s in optimizer.state.values()]
        torch.cuda.synchronize()
        results["copy"].append(time.perf_counter() - start)
        del copy
        start = time.perf_counter()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, work / "plain.pt")
        results["save"].append(time.perf_counter() - start)
    size = (work / "plain.pt").stat().st_size
    return {"stall_state_mb": round(size / 1e6), **{f"{k}_ms_median": 1000 * statistics.median(v) for k, v in results.items()}}


def main(out: str) -> None:
    assert torch.cuda.is_available(), "no GPU"
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for check in (check_resume, check_rollback, check_no_sync, check_stall):
            started = time.perf_counter()
            try:
                results.update(check(work))
            except Exception as error:  # report and go on: one short device session
                results[f"{check.__name__}_error"] = f"{type(error).__name__}: {error}"
            results[f"{check.__name__}_seconds"] = round(time.perf_counter() - started, 1)
            print(json.dumps(results, indent=1), flush=True)
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_check.json")
