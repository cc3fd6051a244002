"""babysit around a model sharded with FSDP2 (``fully_shard``), 2 CPU processes under torchrun
(gloo), driven only through the CLI (tests/fsdp_script.py): every rank obeys each command at the
same step, each checkpoint is a folder of every rank's shard, a rollback retraces its branch, a
kill -9 of the whole job resumes bit-identically, a damaged shard is refused for the checkpoint
before it, a checkpoint of two ranks resumes on one, and what babysit cannot checkpoint is refused
at ``babysit.Run()`` on every rank, without a hang."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from babysit.parallelism import SUPPORTED
from babysit.sharded import DCP_METADATA, MANIFEST, REST
from babysit.store import RunStore
from tests.conftest import REPO, wait_for
from tests.test_torchrun import Job, cli, used_after

SAMPLES_PER_STEP = 16  # each rank's batch
STEPS_PER_EPOCH = 20   # per rank, on two ranks
SHARDED_FILES = sorted([DCP_METADATA, "__0_0.distcp", "__1_0.distcp", REST, MANIFEST])


@pytest.fixture
def jobs() -> Any:
    started: list[Job] = []

    def start(tmp_path: Path, name: str, *args: str, nproc: int = 2) -> Job:
        started.append(Job(tmp_path, name, *args, script="fsdp_script.py", nproc=nproc))
        return started[-1]

    yield start
    for job in started:
        job.kill()


def rows(job: Job, rank: int, branch: int) -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in job.records(rank) if r["branch"] == branch}


def test_every_rank_obeys_each_cli_command_at_the_same_step_and_a_rollback_retraces_its_branch(
        tmp_path: Path, jobs: Any) -> None:
    job = jobs(tmp_path, "run", "--epochs", "10000", "--pause-at-step", "25")
    store = job.store()
    paused = job.wait_state("paused")["step"]
    assert [job.records(r)[-1]["step"] for r in (0, 1)] == [paused, paused]  # both ranks wait at that step

    cli(job, "set", "lr", "0.02")
    cli(job, "set", "momentum", "0.5")
    cli(job, "checkpoint")
    cut = store.checkpoints()[-1]
    assert (cut["reason"], cut["step"], cut["hparams"]) == ("command", paused, {"lr": 0.02, "momentum": 0.5})
    assert cut["file"].endswith(".dcp") and sorted(os.listdir(job.run_dir / cut["file"])) == SHARDED_FILES

    cli(job, "resume")
    for rank in (0, 1):
        wait_for(lambda: len(job.records(rank)) > paused + 5, what=f"rank {rank} training on")
    cli(job, "pause")
    again = store.status()["step"]
    assert [job.records(r)[-1]["step"] for r in (0, 1)] == [again, again]
    for rank in (0, 1):  # the nudges, as each rank's optimizer used them, from the next step on
        before = rows(job, rank, 1)
        assert {(before[s]["lr"], before[s]["momentum"]) for s in range(1, paused + 1)} == {(0.05, 0.9)}
        assert (used_after(job.records(rank), paused, 1)["lr"], used_after(job.records(rank), paused, 1)["momentum"]) \
            == (0.02, 0.5)

    cli(job, "rollback", str(cut["id"]), "--hparams", "checkpoint")
    for rank in (0, 1):
        wait_for(lambda: max(rows(job, rank, 2), default=0) >= again, timeout=180, what=f"rank {rank} back at {again}")
    cli(job, "stop")
    job.finish()
    for rank in (0, 1):  # branch 2 retraces branch 1 from the checkpoint: loss, lr, momentum, run.state
        old, new = rows(job, rank, 1), rows(job, rank, 2)
        assert min(new) == paused + 1
        assert [old[s] | {"branch": 2} for s in range(paused + 1, again + 1)] == \
            [new[s] for s in range(paused + 1, again + 1)]
    assert store.status()["state"] == "stopped"


def test_a_kill_9_resumes_bit_identically_past_a_damaged_shard_and_two_ranks_resume_on_one(
        tmp_path: Path, jobs: Any) -> None:
    straight = jobs(tmp_path, "straight", "--epochs", "3")
    straight.finish()
    job = jobs(tmp_path, "killed", "--epochs", "3", "--keep-last", "2", "--pause-at-step", "25",
               "--pause-at-step", "30")
    store = job.store()
    first_pause = job.wait_state("paused")["step"]
    cli(job, "checkpoint")
    cli(job, "resume")
    wait_for(lambda: store.status()["state"] == "paused" and store.status()["step"] > first_pause, timeout=180,
             what="the second pause")
    cli(job, "checkpoint")
    # The newest checkpoint will be damaged; the resume must fall back to the one before it
    # (this "checkpoint now", or epoch 2's if the second pause came after it).
    intact, damaged = store.checkpoints()[-2:]
    assert damaged["step"] > intact["step"] > 20 and damaged["reason"] == "command"
    job.kill()
    # Retention removed the oldest checkpoint's whole folder.
    first = next(c for c in RunStore(job.run_dir).checkpoints(include_deleted=True) if c["epoch"] == 1)
    assert first["deleted"] and not (job.run_dir / first["file"]).exists()
    shard = job.run_dir / damaged["file"] / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))

    again = jobs(tmp_path, "killed", "--epochs", "3", "--keep-last", "2")
    again.finish()
    refused = [e for e in store.events() if e["kind"] == "checkpoint_refused"]
    assert refused and f"'{shard}' does not match the hash recorded" in refused[0]["message"]
    resumed = [e for e in store.events() if e["kind"] == "resume"]
    assert resumed and f"checkpoint #{intact['id']}" in resumed[-1]["message"]
    reference = torch.load(straight.record / "final-rank0.pt")
    for rank in (0, 1):
        final = torch.load(job.record / f"final-rank{rank}.pt")
        assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
        assert json.loads((job.record / f"end-rank{rank}.json").read_text())["seen"] == \
            3 * STEPS_PER_EPOCH * SAMPLES_PER_STEP
    steps, values, _ = store.chunk_points(next(s for s in store.series() if s.name == "loss" and s.segment == 0).id)
    ref_store = RunStore(straight.run_dir)
    ref_steps, ref_values, _ = ref_store.chunk_points(next(s for s in ref_store.series() if s.name == "loss").id)
    assert steps.tolist() == ref_steps.tolist() and values.tolist() == ref_values.tolist()

    # The same run, on one rank: the two ranks' epoch-3 checkpoint resharded, with what is inexact said.
    alone = jobs(tmp_path, "killed", "--epochs", "4", "--keep-last", "2", nproc=1)
    alone.finish()
    changed = [e for e in store.events() if e["kind"] == "ranks_changed"]
    assert len(changed) == 1 and "written by a job of 2 rank(s), this one has 1" in changed[0]["message"]
    assert "data" in changed[0]["message"] and "random generators" in changed[0]["message"]
    last = store.checkpoints()[-1]
    assert last["epoch"] == 4 and store.status()["state"] == "finished"
    assert json.loads((job.run_dir / last["file"] / MANIFEST).read_text())["world_size"] == 1
    # rank 0's run.state came back: 3 epochs on two ranks, then one epoch of 40 steps on one
    assert json.loads((job.record / "end-rank0.json").read_text())["seen"] == (3 * 20 + 40) * SAMPLES_PER_STEP


def test_a_rank_that_stops_coming_is_named_instead_of_a_silent_hang(tmp_path: Path, jobs: Any) -> None:
    # Rank 1 is stuck after epoch 1's evaluation; rank 0 waits for it at the epoch's end.
    job = jobs(tmp_path, "run", "--epochs", "3", "--stall-after-epoch", "1", "--timeout-s", "8")
    named = ("babysit.errors.RanksOutOfStep: rank 1 did not arrive at an epoch's end after step 20 within 8 s "
             "(stopped, killed, or stuck in a collective of its own)")
    wait_for(lambda: named in job.log.read_text() or job.process.poll() is not None, timeout=120,
             what="rank 0's error")
    assert named in job.log.read_text(), job.log.read_text()
    job.kill()  # the stuck rank (torchrun would give it 30 s to stop)
    store = job.store()  # the page says it too: a wait reported half-way, then the error
    waited = [e for e in store.events() if e["kind"] == "ranks_waiting"]
    assert waited and waited[0]["data"] == {"missing": [1]} and "an epoch's end after step 20" in waited[0]["message"]
    assert store.status()["state"] == "crashed" and "rank 1 did not arrive" in store.status()["message"]


def test_the_docs_example_trains_checkpoints_in_shards_and_resumes(tmp_path: Path) -> None:
    section = (REPO / "docs" / "fsdp.md").read_text().split("## The loop", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "train.py"
    script.write_text(example.replace("run.epochs(20)", "run.epochs(int(sys.argv[1]))")
                      .replace("import torch\n", "import sys\nimport torch\n", 1))

    def torchrun(epochs: int) -> None:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(script), str(epochs)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stdout + done.stderr

    torchrun(2)
    run_dir = tmp_path / "checkpoints" / "my-fsdp-run"
    store = RunStore(run_dir)
    assert [c["epoch"] for c in store.checkpoints()] == [1, 2] and store.status()["state"] == "finished"
    assert all(sorted(os.listdir(run_dir / c["file"])) == SHARDED_FILES for c in store.checkpoints())
    torchrun(3)  # resumes after epoch 2 on both ranks, trains epoch 3 only
    assert [c["epoch"] for c in store.checkpoints()] == [1, 2, 3]
    assert [e["kind"] for e in store.events() if e["kind"] in ("start", "resume")] == ["start", "resume"]


CALLBACKS = r'''
import json, sys, tempfile
import torch, torch.distributed as dist
from torch import nn
import babysit

dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
from torch.distributed.fsdp import fully_shard
import pytorch_lightning as pl
from babysit.hf import BabysitCallback as HfCallback
from babysit.lightning import BabysitCallback as LightningCallback


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        fully_shard(self.net[0])
        fully_shard(self.net)

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


found = {}
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 1)), batch_size=4)
trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, callbacks=[LightningCallback(sys.argv[1] + "/pl")])
try:
    trainer.fit(Regressor(), data)
    found["lightning"] = "trained"
except babysit.SettingsError as error:
    found["lightning"] = str(error)
model = Regressor().net
try:
    HfCallback(sys.argv[1] + "/hf").on_train_begin(None, None, None, model=model,
                                                   optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
    found["hf"] = "started"
except babysit.SettingsError as error:
    found["hf"] = str(error)
print(json.dumps(found))
dist.destroy_process_group()
'''


def test_the_lightning_and_hugging_face_callbacks_refuse_a_sharded_model_at_their_start(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", CALLBACKS, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {framework: f"babysit's {name} callback does not support a sharded model (FSDP) yet: build "
                                f"babysit.Run in the training loop itself; {SUPPORTED}"
                     for framework, name in (("lightning", "Lightning"), ("hf", "Hugging Face"))}
    assert not (tmp_path / "pl").exists() and not (tmp_path / "hf").exists()


REFUSED = r'''
import json, sys
import torch, torch.distributed as dist
from torch import nn
import babysit

dist.init_process_group("gloo")
kind = sys.argv[2]
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
if kind == "fsdp1":
    from torch.distributed.fsdp import FullyShardedDataParallel
    # FSDP1 needs an accelerator to be built: an instance of the real class, made without its __init__.
    wrapped = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(wrapped)
    model.add_module("body", wrapped)
elif kind == "deepspeed":
    class DeepSpeedEngine(nn.Module):  # what deepspeed.initialize returns, as far as a name tells
        def __init__(self, module):
            super().__init__()
            self.module = module
    model = DeepSpeedEngine(model)
elif kind == "tensor-parallel":
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
try:
    babysit.Run(sys.argv[1], model, torch.optim.SGD(model.parameters(), lr=0.1))
    outcome = "built"
except babysit.SettingsError as error:
    outcome = str(error)
dist.barrier()  # every rank got here: none is left waiting for the others
with open(f"{sys.argv[1]}-rank{dist.get_rank()}.json", "w") as out:
    json.dump({"rank": dist.get_rank(), "outcome": outcome}, out)
dist.destroy_process_group()
'''


@pytest.mark.parametrize("kind, found", [
    ("fsdp1", "babysit cannot checkpoint a model wrapped in FullyShardedDataParallel (FSDP1, at body): shard it with "
              "torch.distributed.fsdp.fully_shard (FSDP2) instead"),
    ("deepspeed", "babysit cannot checkpoint a DeepSpeed engine (DeepSpeedEngine): the engine saves its ZeRO shards "
                  "itself (engine.save_checkpoint), out of babysit's reach"),
    ("tensor-parallel", "babysit cannot checkpoint this model: parameter '0.weight' is a DTensor placed as "
                        "(Shard(dim=0),) by something other than fully_shard (tensor parallel?)"),
])
def test_what_babysit_cannot_checkpoint_is_refused_at_run_on_every_rank_without_a_hang(
        tmp_path: Path, kind: str, found: str) -> None:
    script = tmp_path / "refused.py"
    script.write_text(REFUSED)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "run"), kind], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout + done.stderr
    outcomes = [json.loads((tmp_path / f"run-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [o["outcome"] for o in outcomes] == [f"{found}; {SUPPORTED}"] * 2
    assert not (tmp_path / "run").exists()  # refused before anything was created
