"""Trial 2, driven through the CLI only: accelerate_loop.py for 4 epochs of 64 micro-batches. At
step 21 the lr is halved, then the run is paused, checked still, and resumed; at step 70 it is
rolled back to epoch 1's checkpoint; at step 85 of branch 2 it is killed with SIGKILL and started
again. Checks: the script's logged lr over the cosine schedule's own value stays at ×0.5 after the
nudge, through the rollback and the restart (printed below, from the two logs).

    python bench/trials/run_accelerate_loop.py [WORKDIR]
"""

import math
import os
import re
import shutil
import signal
import time

from drive import cli, start, status, wait, workdir

work = workdir()
run_dir = work / "accelerate"
shutil.rmtree(run_dir, ignore_errors=True)
trainer = start("accelerate_loop.py", work / "accelerate-1.log", str(run_dir), "4")
now = wait(run_dir, lambda s: s["step"] >= 21, "step 21")
cli("set", "lr", repr(now["lr"] * 0.5), "--run-dir", str(run_dir), "--wait")
cli("pause", "--run-dir", str(run_dir), "--wait")
before = status(run_dir)["step"]
time.sleep(2)
print("paused: step", before, "->", status(run_dir)["step"])
cli("resume", "--run-dir", str(run_dir), "--wait")
now = wait(run_dir, lambda s: s["step"] >= 70, "step 70")
epoch_1 = next(c for c in now["checkpoints"] if c["epoch"] == 1)
cli("rollback", str(epoch_1["id"]), "--run-dir", str(run_dir), "--wait")
wait(run_dir, lambda s: s["branch"] == 2 and s["step"] >= 85, "branch 2, step 85")
os.kill(trainer.pid, signal.SIGKILL)
trainer.wait()
again = start("accelerate_loop.py", work / "accelerate-2.log", str(run_dir), "4")
print("restarted script exit status", again.wait())
cli("status", "--run-dir", str(run_dir))


def schedule(t: int) -> float:  # get_scheduler("cosine", num_warmup_steps=10, num_training_steps=128), lr 5e-4
    return 5e-4 * (t / 10 if t < 10 else 0.5 * (1 + math.cos(math.pi * (t - 10) / 118)))


for log in ("accelerate-1.log", "accelerate-2.log"):
    ratios = []
    for line in open(work / log):
        found = re.search(r"epoch (\d+) step (\d+) loss [\d.]+ lr ([\d.e+-]+)", line)
        if found:
            epoch, step, lr = int(found[1]), int(found[2]), float(found[3])
            expected = schedule(((epoch - 1) * 64 + step + 1) // 2)
            if expected:
                ratios.append(round(lr / expected, 3))
    print(log, "lr / schedule, every 16th step:", ratios[::16])
