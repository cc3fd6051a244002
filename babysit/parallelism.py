"""How a model is spread over the ranks of a job, and whether babysit can checkpoint it.

babysit checkpoints a plain model, one wrapped in ``DistributedDataParallel`` (every rank holds the
whole model: rank 0 writes it), and one sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``:
each rank writes its own shard through ``torch.distributed.checkpoint``, see :mod:`babysit.sharded`).
Anything else it cannot save and restore exactly, and a rank waiting on a checkpoint it cannot take
would wait without a word, so :func:`refusal` says so before the run starts:

- FSDP1 (``FullyShardedDataParallel``): its flat parameters need its own state-dict modes;
- tensor parallel, HSDP or any other DTensor layout than one shard per rank along dim 0 of a mesh
  over the whole job (what ``fully_shard`` makes);
- a DeepSpeed engine or optimizer: the engine saves its ZeRO shards itself (``save_checkpoint``).
  DeepSpeed is never imported: its classes are recognised by name;
- the Lightning and Hugging Face callbacks around a sharded model (their strategies save shards their
  own way); babysit.Run in the loop itself is the supported way.

Nothing here imports a part of torch.distributed that the program has not imported itself (the
DTensor and FSDP modules take seconds to import): a model cannot hold a DTensor or an FSDP1 wrapper
unless they were imported already.
"""

from __future__ import annotations

import sys
from typing import Any

SUPPORTED = ("babysit checkpoints a plain model, DistributedDataParallel, and FSDP2 "
             "(torch.distributed.fsdp.fully_shard on a 1-D mesh over every rank, with a torch optimizer), "
             "in a loop around babysit.Run (see docs/fsdp.md)")


def dtensor_class() -> type | None:
    """``DTensor``, if the program has imported it (else no tensor can be one)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_sharded(model: Any) -> bool:
    """True when some parameter of ``model`` is a DTensor (a model sharded with ``fully_shard``)."""
    dtensor = dtensor_class()
    parameters = getattr(model, "parameters", None)
    return dtensor is not None and callable(parameters) and any(isinstance(p, dtensor) for p in parameters())


def refusal(model: Any, optimizer: Any = None, *, framework: str | None = None) -> str | None:
    """Why babysit cannot checkpoint ``model`` (with ``optimizer``), or None when it can.

    ``framework``: the callback the run is driven by ("Lightning", "Hugging Face"), if any. The
    message names what was found and says what is supported."""
    deepspeed = _deepspeed_class(model) or _deepspeed_class(optimizer)
    if deepspeed is not None:
        return (f"babysit cannot checkpoint a DeepSpeed engine ({deepspeed}): the engine saves its ZeRO shards "
                f"itself (engine.save_checkpoint), out of babysit's reach; {SUPPORTED}")
    fsdp1 = _fsdp1_module(model)
    if fsdp1 is not None:
        return (f"babysit cannot checkpoint a model wrapped in FullyShardedDataParallel (FSDP1, at "
                f"{fsdp1 or 'the model itself'}): shard it with torch.distributed.fsdp.fully_shard (FSDP2) instead; "
                f"{SUPPORTED}")
    layout = _unsupported_layout(model)
    if layout is not None:
        return f"babysit cannot checkpoint this model: {layout}; {SUPPORTED}"
    if framework is not None and is_sharded(model):
        return (f"babysit's {framework} callback does not support a sharded model (FSDP) yet: build babysit.Run "
                f"in the training loop itself; {SUPPORTED}")
    return None


def _deepspeed_class(obj: Any) -> str | None:
    """The name of a DeepSpeed class ``obj`` is an instance of (recognised without importing it)."""
    if obj is None:
        return None
    for cls in type(obj).__mro__:
        if cls.__module__.split(".")[0] == "deepspeed" or cls.__name__.startswith("DeepSpeed"):
            return cls.__name__
    return None


def _fsdp1_module(model: Any) -> str | None:
    """The name of a module of ``model`` wrapped in FSDP1 ("" for the model itself), or None."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    wrapper = getattr(fsdp, "FullyShardedDataParallel", None)
    named_modules = getattr(model, "named_modules", None)
    if wrapper is None or not callable(named_modules):
        return None
    return next((name for name, module in named_modules() if isinstance(module, wrapper)), None)


def _unsupported_layout(model: Any) -> str | None:
    """What is wrong with the DTensor parameters of ``model``, if any: babysit takes the layout
    ``fully_shard`` makes (one shard per rank along dim 0, on a 1-D mesh over the whole job)."""
    dtensor = dtensor_class()
    if dtensor is None or not callable(getattr(model, "named_parameters", None)):
        return None
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import Shard

    managed = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    world = dist.get_world_size() if dist.is_initialized() else 1
    for name, parameter in model.named_parameters():
        if not isinstance(parameter, dtensor):
            continue
        mesh, placements = parameter.device_mesh, tuple(parameter.placements)
        if not any(owner == "" or name.startswith(owner + ".") for owner in managed):
            return (f"parameter {name!r} is a DTensor placed as {placements} by something other than fully_shard "
                    "(tensor parallel?)")
        if mesh.ndim != 1 or placements != (Shard(0),):
            return (f"parameter {name!r} is placed as {placements} on a mesh of shape {tuple(mesh.shape)} "
                    "(tensor parallel or HSDP); only fully_shard's one shard per rank along dim 0 on a 1-D mesh is "
                    "supported")
        if mesh.size() != world:
            return (f"parameter {name!r} is sharded over {mesh.size()} of the job's {world} ranks; babysit needs "
                    "every rank of the job in the mesh")
    return None
