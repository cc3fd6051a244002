"""The loop's own state (``run.state``), carried in every checkpoint and brought back with it.

A value in ``run.state`` is either plain data — numbers, strings, booleans, None, tensors, and
lists, tuples and dicts of them: what ``torch.load(weights_only=True)`` reads back — or an object
following the ``state_dict()`` / ``load_state_dict()`` convention (torch.distributed.checkpoint's
Stateful), whose state is saved and loaded into the live object on resume and rollback. Anything
else is refused when the checkpoint is taken, with the key that holds it, rather than written into
a file that could not be loaded safely.

A tensor comes back on the device it was saved from when that device exists here (an RNN's
hidden state on the GPU stays on the GPU), else on the CPU.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch


PLAIN = "plain"
STATEFUL = "stateful"
DEVICES = "devices"
_SCALARS = (bool, int, float, str, type(None))
ACCEPTED = ("numbers, strings, booleans, None, tensors, lists/tuples/dicts of those, "
            "or an object with state_dict() and load_state_dict()")


def is_stateful(value: Any) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


def _plain(value: Any, where: str) -> Any:
    """``value`` as the checkpoint will hold it: NumPy scalars (``np.mean(losses)``) become Python
    numbers; exact types only, since a subclass of float (np.float64 is one) is not plain data to
    ``weights_only`` loading. Raises TypeError naming where the refused value is."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, np.generic) and value.shape == ():
        return value.item()
    if kind in (list, tuple):
        return kind(_plain(item, f"{where}[{index}]") for index, item in enumerate(value))
    if kind is dict:
        out = {}
        for key, item in value.items():
            if type(key) not in _SCALARS:
                raise TypeError(f"{where} has a key of type {type(key).__name__}, which a checkpoint cannot hold "
                                f"safely; accepted: {ACCEPTED}")
            out[key] = _plain(item, f"{where}[{key!r}]")
        return out
    raise TypeError(f"{where} holds a {kind.__module__}.{kind.__name__}, which a checkpoint "
                    f"cannot hold safely; accepted: {ACCEPTED}")


def plain_copy(value: Any, where: str) -> Any:
    """``value`` copied as plain data a checkpoint can hold (a loader's ``state_dict()``), or
    TypeError naming ``where`` the first value that is not."""
    return _plain(value, where)


def _devices(value: Any, path: tuple[Any, ...], found: dict[str, str]) -> None:
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            found[repr(path)] = str(value.device)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _devices(item, (*path, index), found)
    elif isinstance(value, dict):
        for key, item in value.items():
            _devices(item, (*path, key), found)


def check(state: dict[str, Any]) -> None:
    """Raise TypeError naming the first value of ``state`` a checkpoint could not hold."""
    capture(state, on_refused=None)


def capture(state: dict[str, Any], on_refused: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """A checkpointable copy of ``run.state`` (tensors cloned on their device). A value a
    checkpoint cannot hold raises TypeError naming its key, or — with ``on_refused(key, message)``
    — is left out of this checkpoint, so that training goes on and everything else is saved."""
    plain: dict[str, Any] = {}
    stateful: dict[str, Any] = {}
    for key, value in state.items():
        try:
            if type(key) is not str:
                raise TypeError(f"run.state keys must be strings, got {key!r}")
            if is_stateful(value) and not isinstance(value, torch.Tensor):
                stateful[key] = _plain(value.state_dict(), f"run.state[{key!r}].state_dict()")
            else:
                plain[key] = _plain(value, f"run.state[{key!r}]")
        except TypeError as error:
            if on_refused is None:
                raise
            on_refused(str(key), str(error))
    devices: dict[str, str] = {}
    _devices({PLAIN: plain, STATEFUL: stateful}, (), devices)
    return {PLAIN: plain, STATEFUL: stateful, DEVICES: devices}


def _to_devices(value: Any, path: tuple[Any, ...], devices: dict[str, str]) -> Any:
    if isinstance(value, torch.Tensor):
        device = devices.get(repr(path))
        if device is not None and _device_available(device):
            return value.to(device)
        return value
    if isinstance(value, list):
        return [_to_devices(item, (*path, index), devices) for index, item in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_to_devices(item, (*path, index), devices) for index, item in enumerate(value))
    if isinstance(value, dict):
        return {key: _to_devices(item, (*path, key), devices) for key, item in value.items()}
    return value


def _device_available(device: str) -> bool:
    place = torch.device(device)
    if place.type == "cuda":
        return torch.cuda.is_available() and (place.index or 0) < torch.cuda.device_count()
    return place.type == "cpu" or (place.type == "mps" and torch.backends.mps.is_available())


def restore(live: dict[str, Any], saved: dict[str, Any] | None) -> list[str]:
    """Put a checkpoint's user state back into ``live`` (``run.state``), in place.

    Plain values replace the live ones; a Stateful object in ``live`` loads its saved state. Keys
    the loop added after that checkpoint are removed (they did not exist at that point of the run).
    Returns the notes worth an event: saved Stateful state with no live object to load it into.
    """
    if saved is None:  # a checkpoint from before run.state existed: the caller passes the initial state
        return []
    devices = saved.get(DEVICES, {})
    saved = _to_devices({PLAIN: saved.get(PLAIN, {}), STATEFUL: saved.get(STATEFUL, {})}, (), devices)
    notes = []
    for key in [k for k in live if k not in saved[PLAIN] and k not in saved[STATEFUL] and not is_stateful(live[k])]:
        del live[key]
    live.update(saved[PLAIN])
    for key, state in saved[STATEFUL].items():
        target = live.get(key)
        if is_stateful(target):
            target.load_state_dict(state)
        else:
            notes.append(f"the checkpoint holds the state of run.state[{key!r}] but run.state has no object with "
                         "load_state_dict() under that name (pass it to Run(state=...)); it was not restored")
    return notes
