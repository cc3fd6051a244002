"""Sharded checkpoints: a model sharded with FSDP2 is saved and loaded through
``torch.distributed.checkpoint`` (DCP), every rank writing and reading its own shard.

A sharded checkpoint is a folder in the run directory, listed in the store as a file is::

    epoch-0002-step-00000040-b1.dcp/
        __0_0.distcp    rank 0's shard of the model and the optimizer (DCP writes one file per rank)
        __1_0.distcp    rank 1's shard
        .metadata       DCP's index: which slice of which tensor lies where
        babysit.pt      rank 0's file: what a single-file checkpoint holds besides the model and the
                        optimizer (every rank's RNGs, the position, run.state, hparams, scheduler, config)
        manifest.json   the job's number of ranks, every other file's SHA-256 and size; the store lists
                        the manifest's own SHA-256, so one hash vouches for every file

Writing: :func:`stage` on the training thread, then :mod:`babysit.sharded_writer`. Reading:
:func:`read_sharded` checks the manifest against the store's hash and each file against the
manifest (a missing or altered file makes the whole checkpoint unusable, named in the message, so
a resume falls back to the checkpoint before); :func:`load_shards` then loads, on every rank, what
it needs (DCP reshards: a checkpoint of N ranks loads on M), through :mod:`babysit.dcp_folder`,
which checks each file it opens before anything in it is decoded and unpickles nothing but
tensors and plain data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .checkpoint import SHARDED_SUFFIX, clone_tree, read_verified
from .dcp_folder import DCP_METADATA, Folder, folder_reader, load_metadata, weights_only_planner
from .errors import CheckpointError, RunDirError
from .rundir import is_plain_name, path_in

SHARDED_FORMAT = "babysit-sharded-1"
MANIFEST = "manifest.json"
REST = "babysit.pt"
# In babysit.pt and in what read_sharded returns: the shards' folder, files and number of ranks.
KEY_SHARDED = "sharded"
# The keys of the state dict DCP saves.
DCP_MODEL, DCP_OPTIMIZER = "model", "optimizer"


def is_sharded_name(name: str) -> bool:
    """Whether the store's file name ``name`` is a sharded checkpoint's folder."""
    return isinstance(name, str) and name.endswith(SHARDED_SUFFIX)


# -- the training thread's share ---------------------------------------------------------------
def state_dicts(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """This rank's shard of the model and of the optimizer: DCP's sharded state dicts, whose
    tensors are the live ones (copy them before the next step changes them: :func:`stage`, or
    :class:`~babysit.sharded_writer.ShardedCheckpointer`). ``optimizer``: a torch optimizer, or
    anything else (a loop's own updates; its hparams travel in ``babysit.pt``)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if isinstance(optimizer, torch.optim.Optimizer):
        fresh = not optimizer.state
        model_state, optimizer_state = get_state_dict(model, optimizer)
        if fresh:
            # get_state_dict made the state with a step of lr 0 (Adam's count is then 1): neither
            # the checkpoint nor the optimizer may keep it, or the next real step would differ.
            optimizer.state.clear()
            optimizer_state["state"] = {}
        return {DCP_MODEL: model_state, DCP_OPTIMIZER: optimizer_state}
    return {DCP_MODEL: get_model_state_dict(model)}


def stage(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """:func:`state_dicts`, copied where the tensors are (a GPU's on the GPU)."""
    return clone_tree(state_dicts(model, optimizer))


def local_shards(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The tensors of a sharded state dict as this rank holds them (a DTensor's own shard): a
    DTensor's sum would be a collective, which a background thread must never start."""
    return {name: value.to_local() if hasattr(value, "to_local") else value for name, value in state_dict.items()}


# -- reading -------------------------------------------------------------------------------------
def read_checkpoint(run_dir: Path | str, name: str, sha256: str | None, *, verify_shards: bool = True) -> dict[str, Any]:
    """A listed checkpoint, whatever its form, verified: a file's state (see
    :func:`~babysit.checkpoint.read_verified`), or a sharded checkpoint's ``babysit.pt`` with
    ``KEY_SHARDED`` saying where its shards are (:func:`read_sharded`)."""
    if is_sharded_name(name):
        return read_sharded(run_dir, name, sha256, verify_shards=verify_shards)
    try:
        path = path_in(run_dir, name)
    except RunDirError as error:
        raise CheckpointError(f"checkpoint file refused: {error}") from None
    return read_verified(path, sha256)


def read_sharded(run_dir: Path | str, name: str, sha256: str | None, *, verify_shards: bool = True) -> dict[str, Any]:
    """Check a sharded checkpoint and return its ``babysit.pt`` (with ``KEY_SHARDED``: the folder,
    its files' hashes and the number of ranks that wrote it), for :func:`load_shards`.

    The manifest must match ``sha256`` (the store's); every file it lists must be there, a
    regular file, with its recorded hash (``verify_shards=False``: the shards are left to
    :func:`load_shards`, which checks each as it opens it). Raises CheckpointError naming the file."""
    try:
        folder_path = path_in(run_dir, name)
    except RunDirError as error:
        raise CheckpointError(f"checkpoint refused: {error}") from None
    with Folder.open(folder_path) as folder:
        manifest = _read_manifest(folder, sha256)
        folder.expected = manifest["files"]
        if verify_shards:
            for file in manifest["files"]:
                if file not in (REST, DCP_METADATA):
                    with folder.open_checked(file):
                        pass
        metadata = load_metadata(folder)
        state = read_verified(folder_path / REST, manifest["files"][REST]["sha256"])
    state[KEY_SHARDED] = {"run_dir": str(run_dir), "folder": name, "world_size": manifest["world_size"],
                          "files": {file: dict(entry) for file, entry in manifest["files"].items()},
                          "model_shapes": model_shapes(metadata)}
    return state


def model_shapes(metadata: Any) -> dict[str, tuple[int, ...]]:
    """The whole shape of each model tensor in a checkpoint's index (to tell, before anything is
    loaded, whether it fits a model)."""
    prefix = DCP_MODEL + "."
    return {key[len(prefix):]: tuple(entry.size) for key, entry in metadata.state_dict_metadata.items()
            if key.startswith(prefix) and hasattr(entry, "size")}


def _read_manifest(folder: Folder, sha256: str | None) -> dict[str, Any]:
    where = str(folder.path / MANIFEST)
    with folder.open_read(MANIFEST) as handle:
        data = handle.read(1 << 24)
    found = hashlib.sha256(data).hexdigest()
    if sha256 is not None and found != sha256:
        raise CheckpointError(
            f"checkpoint file {where!r} does not match the hash recorded when it was written "
            f"(recorded {sha256[:12]}…, found {found[:12]}…): it was truncated or altered; the checkpoint cannot be used")
    try:
        manifest = json.loads(data)
    except ValueError:
        raise CheckpointError(f"checkpoint file {where!r} is not a manifest (not JSON)") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (manifest.get("format") if isinstance(manifest, dict) else None) != SHARDED_FORMAT or not isinstance(files, dict):
        raise CheckpointError(f"checkpoint file {where!r} is not a babysit sharded checkpoint's manifest "
                              f"(format {SHARDED_FORMAT} expected)")
    world = manifest.get("world_size")
    if not isinstance(world, int) or world < 1:
        raise CheckpointError(f"checkpoint file {where!r} gives no number of ranks")
    for file, entry in files.items():
        if not isinstance(file, str) or file == MANIFEST or not is_plain_name(file) or not isinstance(entry, dict) \
                or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("size"), int):
            raise CheckpointError(f"checkpoint file {where!r} lists {file!r}, which is not a file of its folder")
    for needed in (REST, DCP_METADATA):
        if needed not in files:
            raise CheckpointError(f"checkpoint file {where!r} does not list {needed!r}; the checkpoint cannot be used")
    return manifest


def load_shards(sharded: dict[str, Any], model: torch.nn.Module, optimizer: Any, *, group: Any = None) -> None:
    """Load a sharded checkpoint's model and optimizer state (``sharded``: what
    :func:`read_sharded` put under ``KEY_SHARDED``) into ``model`` and ``optimizer``, on every rank
    together (a collective, on ``group``, else the default group; none without torch.distributed).

    DCP reshards: a checkpoint written by N ranks loads on M, sharded or not. Each file is hashed
    when opened, before anything in it is decoded. Raises CheckpointError naming the file or the
    key that does not fit; a failure on any rank is raised on every rank."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
    )

    folder_path = path_in(sharded["run_dir"], sharded["folder"])
    with_optimizer = isinstance(optimizer, torch.optim.Optimizer)
    if with_optimizer:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {DCP_MODEL: model_state, DCP_OPTIMIZER: optimizer_state}
    else:
        state = {DCP_MODEL: get_model_state_dict(model)}
    with Folder.open(folder_path, expected=sharded["files"]) as folder:
        metadata = load_metadata(folder)
        if with_optimizer:
            _as_saved(state, metadata)
        try:
            dcp.load(state, storage_reader=folder_reader(folder, metadata), planner=weights_only_planner(),
                     process_group=group, no_dist=not (dist.is_available() and dist.is_initialized()))
        except BaseException as error:
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            raise _load_refusal(error, folder_path) from None
    if with_optimizer:
        set_state_dict(model, optimizer, model_state_dict=state[DCP_MODEL], optim_state_dict=state[DCP_OPTIMIZER])
    else:
        set_model_state_dict(model, state[DCP_MODEL])


def _as_saved(state: dict[str, Any], metadata: Any) -> None:
    """Shape the optimizer's part of ``state`` (what DCP loads into) as the checkpoint saved it,
    as ``optimizer.load_state_dict`` would: DCP loads only the keys the live optimizer has, and
    the live optimizer's state depends on its history (SGD built without momentum and nudged to
    0.9 has momentum buffers only after the nudge; a resumed one has none until told). So the
    saved state entries and param_group values are all asked for, and live ones the checkpoint
    lacks are dropped (a group keeps what torch's own defaults give it)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    model_state, optimizer_state = state[DCP_MODEL], state[DCP_OPTIMIZER]
    saved_state: dict[str, dict[str, Any]] = {}
    saved_groups: dict[int, set[str]] = {}
    for key, path in (metadata.planner_data or {}).items():
        if len(path) != 4 or path[0] != DCP_OPTIMIZER:
            continue
        if path[1] == "state":
            entry = metadata.state_dict_metadata.get(key)
            saved_state.setdefault(path[2], {})[path[3]] = entry
        elif path[1] == "param_groups":
            saved_groups.setdefault(path[2], set()).add(path[3])
    live_state = optimizer_state.setdefault("state", {})
    for fqn in list(live_state):
        if fqn not in saved_state:
            del live_state[fqn]
    for fqn, entries in saved_state.items():
        live = live_state.setdefault(fqn, {})
        for name in [name for name in live if name not in entries]:
            del live[name]
        for name, entry in entries.items():
            if name in live:
                continue
            if isinstance(entry, TensorStorageMetadata):
                like = model_state.get(fqn)
                dtype = entry.properties.dtype
                live[name] = (torch.zeros_like(like, dtype=dtype) if like is not None and like.shape == entry.size
                              else torch.zeros(entry.size, dtype=dtype))
            else:
                live[name] = None  # a value saved as bytes: DCP sets it
    for index, group in enumerate(optimizer_state.get("param_groups", [])):
        if index not in saved_groups:
            continue
        names = saved_groups[index]
        for name in [name for name in group if name not in names]:
            del group[name]
        for name in names - set(group):
            group[name] = None


def _load_refusal(error: BaseException, folder: Path) -> CheckpointError:
    """One message for a failed ``dcp.load``: ours (a file refused) when it is behind it, else what
    does not fit."""
    for inner in failures(error):
        seen = inner
        while seen is not None:
            if isinstance(seen, CheckpointError):
                return CheckpointError(str(seen))
            seen = seen.__cause__ or seen.__context__
    text = describe(error)
    if "Missing key" in text or "mismatch" in text or "size" in text:
        return CheckpointError(f"sharded checkpoint {str(folder)!r} does not fit the model: {text}")
    return CheckpointError(f"sharded checkpoint {str(folder)!r} could not be loaded: {text}")


def failures(error: BaseException) -> list[BaseException]:
    """The errors behind ``error``: DCP gathers every rank's into one CheckpointException."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        return [pair[0] if isinstance(pair, tuple) else pair for pair in failures.values()]
    return [error]


def describe(error: BaseException) -> str:
    """One line for ``error`` (DCP's own exception holds every rank's traceback)."""
    parts = []
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        for rank, pair in sorted(failures.items()):
            inner = pair[0] if isinstance(pair, tuple) else pair
            parts.append(f"rank {rank}: {type(inner).__name__}: {inner}")
        return "; ".join(parts)
    return f"{type(error).__name__}: {error}"
