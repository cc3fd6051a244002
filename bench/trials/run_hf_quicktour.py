"""Trial 1, driven through the CLI only: hf_quicktour.py for 40 epochs of 25 steps. At step 30 the
lr is halved (`set lr`), at step 130 the run is rolled back to epoch 3's checkpoint (its
hyperparameters, the nudge included), at step 160 of branch 2 the trainer is killed with SIGKILL,
and the same script is started again. Checks: it ends without a crash, the lr stays halved through
the linear schedule (the script's log: learning_rate), and the Trainer's best model at the end is
one of this branch's folders.

    python bench/trials/run_hf_quicktour.py [WORKDIR]      # several minutes on a loaded CPU
"""

import os
import shutil
import signal

from drive import cli, start, wait, workdir

work = workdir()
run_dir = work / "hf"
shutil.rmtree(run_dir, ignore_errors=True)
trainer = start("hf_quicktour.py", work / "hf-1.log", str(run_dir), "40")
now = wait(run_dir, lambda s: s["step"] >= 30, "step 30")
cli("set", "lr", repr(now["lr"] * 0.5), "--run-dir", str(run_dir), "--wait")
now = wait(run_dir, lambda s: s["step"] >= 130, "step 130")
epoch_3 = next(c for c in now["checkpoints"] if c["epoch"] == 3)
cli("rollback", str(epoch_3["id"]), "--run-dir", str(run_dir), "--wait")
now = wait(run_dir, lambda s: s["branch"] == 2 and s["step"] >= 160, "branch 2, step 160")
os.kill(trainer.pid, signal.SIGKILL)
trainer.wait()
cli("status", "--run-dir", str(run_dir))
again = start("hf_quicktour.py", work / "hf-2.log", str(run_dir), "40")
print("restarted script exit status", again.wait())
cli("status", "--run-dir", str(run_dir))
print("logs:", work / "hf-1.log", work / "hf-2.log", "(BEST / FINAL EVAL at the end of the second)")
