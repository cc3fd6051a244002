"""Trial 4, driven through the CLI only: plain_tutorial.py for 12 epochs of 94 batches. At step 60
the lr is halved and the momentum set to 0.8 (acknowledged with the warning that OneCycleLR cycles
momentum and overwrites it); at step 300 the run is rolled back to epoch 2's checkpoint with
`--skip-batches 3`; at step 240 of branch 2 it gets SIGTERM (a final checkpoint, exit status 0) and
is started again. Checks: 12 × 94 − 3 steps in all; after the rollback and after the restart the
tqdm bar starts at the batches already trained (3/94, then N/94, never more than 94) and `i` goes
on from there; the resume skips by the sampler (no "reads the N batches ... and throws them away").

    python bench/trials/run_plain_tutorial.py [WORKDIR]
"""

import os
import re
import shutil
import signal

from drive import cli, start, wait, workdir

work = workdir()
run_dir = work / "plain"
shutil.rmtree(run_dir, ignore_errors=True)
shutil.rmtree(f"{run_dir}-saves", ignore_errors=True)
trainer = start("plain_tutorial.py", work / "plain-1.log", str(run_dir), "12")
now = wait(run_dir, lambda s: s["step"] >= 60, "step 60")
cli("set", "lr", repr(now["lr"] * 0.5), "--run-dir", str(run_dir), "--wait")
cli("set", "momentum", "0.8", "--run-dir", str(run_dir), "--wait")
now = wait(run_dir, lambda s: s["step"] >= 300, "step 300")
epoch_2 = next(c for c in now["checkpoints"] if c["epoch"] == 2)
cli("rollback", str(epoch_2["id"]), "--skip-batches", "3", "--run-dir", str(run_dir), "--wait")
wait(run_dir, lambda s: s["branch"] == 2 and s["step"] >= 240, "branch 2, step 240")
trainer.send_signal(signal.SIGTERM)
print("exit status after SIGTERM", trainer.wait())
cli("status", "--run-dir", str(run_dir))
again = start("plain_tutorial.py", work / "plain-2.log", str(run_dir), "12")
print("restarted script exit status", again.wait())
cli("status", "--run-dir", str(run_dir))
for log in ("plain-1.log", "plain-2.log"):
    text = open(work / log).read().replace("\r", "\n")
    counts = [int(n) for n in re.findall(r"\| +(\d+)/94 \[", text)]
    print(log, "bar counts beyond 94:", [n for n in counts if n > 94], "; lines over 94 as 'Nit':",
          re.findall(r"Epoch \d+: \d+it ", text), "; read-and-thrown-away notes:", text.count("throws them away"))
