"""Checkpoints that cannot hold NaN: ``assert_finite`` and an atomic ``save``.

    fastnorm.checkpoint.save({"model": model.state_dict(), "optim": optim.state_dict(),
                              "obs_norm": norm.state_dict()}, "ckpt.pt")

``save`` checks everything first and refuses a non-finite object, then writes a temporary file
beside ``path`` and renames it over ``path``: the previous checkpoint stays intact until the new
one is complete, so a diverged run or a crash mid-write never costs the last good checkpoint.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping
from typing import Any, Iterator, Union

import torch
from torch import Tensor, nn


class NonFiniteError(ValueError):
    """A tensor or number in a state holds NaN or +-inf; ``path`` names where."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


def _leaves(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(path, value) of every tensor and float in a nested state, depth first in order."""
    if isinstance(obj, nn.Module):
        yield from _leaves(obj.state_dict(), path)
    elif isinstance(obj, torch.optim.Optimizer):
        yield from _leaves(obj.state_dict(), path)
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _leaves(value, f"{path}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _leaves(value, f"{path}[{i}]")
    elif isinstance(obj, (Tensor, float)):
        yield path, obj


def _checkable(t: Tensor) -> Tensor:
    if t.is_sparse:
        t = t.coalesce().values()
    return t


def assert_finite(state: Any, name: str = "state") -> None:
    """Raises NonFiniteError naming the first tensor (or float) that holds NaN or +-inf.

    ``state``: a module (its state_dict), an optimizer (its state_dict), a tensor, or nested
    dicts, lists and tuples of them (a state dict, a dict of state dicts). Integer and bool
    tensors are finite by construction; meta tensors hold no values and are skipped. One host
    sync per device, however many tensors.
    """
    leaves = list(_leaves(state, name))
    tensors = [(path, _checkable(v)) for path, v in leaves
               if isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex()) and v.device.type != "meta"]
    bad_tensors = set()
    for device in {t.device for _, t in tensors}:
        on_device = [(path, t) for path, t in tensors if t.device == device]
        all_finite = torch.stack([torch.isfinite(t).all() for _, t in on_device]).tolist()
        bad_tensors.update(path for (path, _), ok in zip(on_device, all_finite) if not ok)
    for path, value in leaves:
        if isinstance(value, float) and not math.isfinite(value):
            raise NonFiniteError(f"{path} = {value} is not finite", path)
        if path in bad_tensors:
            t = _checkable(value)
            bad = ~torch.isfinite(t)
            first = tuple(int(i) for i in bad.nonzero()[0].tolist())
            raise NonFiniteError(
                f"{path} holds {int(bad.sum())} non-finite of {t.numel()} values "
                f"(shape {tuple(t.shape)}, dtype {t.dtype}; first at index {first}: {t[first].item()})", path)


def save(obj: Any, path: Union[str, os.PathLike], **torch_save_kwargs) -> None:
    """``torch.save(obj, path)`` that refuses a non-finite ``obj`` (NonFiniteError, nothing
    written) and writes atomically: a temporary file in path's directory, flushed to disk, then
    renamed over ``path``. On any error the temporary file is removed and ``path`` is untouched."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"path must be a file path, got the directory {path!r}")
    assert_finite(obj, name="obj")
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex}.tmp")
    # O_EXCL: never write through someone else's file; mode 0o666 lets the umask decide, as for open().
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f, **torch_save_kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Makes the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
