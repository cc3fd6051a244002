"""Trial 3, driven through the CLI only: lightning_gan.py for 8 epochs of 57 steps. At step 30 the
discriminator's lr (optimizer 1, the second of configure_optimizers) is halved with
`set lr ... --optimizer 1`; an unknown name (`--optimizer D`) is refused naming the run's; at step
180 the run is rolled back to epoch 2's checkpoint (after the nudge); at step 140 of branch 2 it is
killed with SIGKILL and started again. Checks: it ends, optimizer 1's lr is half optimizer 0's
through StepLR (the DONE line of the second log, and `status`).

    python bench/trials/run_lightning_gan.py [WORKDIR]
"""

import os
import shutil
import signal

from drive import cli, start, wait, workdir

work = workdir()
run_dir = work / "lightning-gan"
shutil.rmtree(run_dir, ignore_errors=True)
trainer = start("lightning_gan.py", work / "gan-1.log", str(run_dir), "8")
now = wait(run_dir, lambda s: s["step"] >= 30, "step 30")
cli("set", "lr", repr(now["optimizers"]["1"]["lr"] * 0.5), "--optimizer", "1", "--run-dir", str(run_dir), "--wait")
cli("set", "lr", "1e-4", "--optimizer", "D", "--run-dir", str(run_dir), "--wait")  # refused: the names are 0, 1
now = wait(run_dir, lambda s: s["step"] >= 180, "step 180")
epoch_2 = next(c for c in now["checkpoints"] if c["epoch"] == 2)
cli("rollback", str(epoch_2["id"]), "--run-dir", str(run_dir), "--wait")
wait(run_dir, lambda s: s["branch"] == 2 and s["step"] >= 140, "branch 2, step 140")
os.kill(trainer.pid, signal.SIGKILL)
trainer.wait()
again = start("lightning_gan.py", work / "gan-2.log", str(run_dir), "8")
print("restarted script exit status", again.wait())
cli("status", "--run-dir", str(run_dir))
print([line for line in open(work / "gan-2.log") if line.startswith("DONE")])
