"""Checkpoints that survive a crash mid-save, and resuming at any micro-step.

``save_checkpoint`` writes a temporary file beside the target, flushes and fsyncs it, then
renames it over the target (and fsyncs the directory), so a crash at any moment leaves
either the previous checkpoint or the new one, never a partial file. ``load_checkpoint``
reads with ``torch.load(weights_only=True)`` and turns an unreadable file into a
``CheckpointError``. ``capture``/``restore`` are the functional form of
``GradientAccumulator.state_dict``/``load_state_dict``::

    save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "accum": capture(state, opt, scaler)}, "ckpt.pt")
    ...
    ckpt = load_checkpoint("ckpt.pt")
    model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["optimizer"])
    state = restore(ckpt["accum"], accumfn.init(4), opt, scaler)
"""

from __future__ import annotations

import os
import pickle
import re
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, CheckpointNotFoundError

__all__ = ["PathLike", "load_checkpoint", "save_checkpoint"]

PathLike = str | os.PathLike[str]


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    obj: object, path: PathLike, *, before_replace: Callable[[Path], None] | None = None
) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; return the path.

    The data go to a temporary file in the same directory, which is flushed, fsynced and
    renamed over ``path``; the directory is fsynced after. ``before_replace`` is called with
    the temporary file once it is complete and durable, just before the rename (to verify
    it, or to test a crash there). On error the temporary file is removed and ``path`` is
    untouched (an object torch.save cannot pickle gives ``CheckpointError``). A process
    killed mid-save may leave a ``.<name>.*.tmp`` file, never a broken ``path``.
    """
    target = Path(path)
    directory = target.parent
    if not directory.is_dir():
        raise CheckpointError(
            f"cannot save checkpoint {str(target)!r}: directory {str(directory)!r} does not "
            f"exist; create it first (Path(...).mkdir(parents=True, exist_ok=True))."
        )
    temp = directory / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(temp, "xb") as file:
            _save(obj, file, target)
            file.flush()
            os.fsync(file.fileno())
        if before_replace is not None:
            before_replace(temp)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    return target


def _save(obj: object, file: Any, target: Path) -> None:
    try:
        torch.save(obj, file)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise CheckpointError(
            f"cannot save checkpoint {str(target)!r}: {type(exc).__name__}: {exc}. Save "
            f"state_dict()s and plain values (tensors, numbers, strings, lists, dicts), not "
            f"lambdas, local functions, locks or open files; {str(target)!r} was not touched."
        ) from exc


_UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile)


def load_checkpoint(path: PathLike, *, map_location: Any = None) -> Any:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    Raises ``CheckpointNotFoundError`` (a ``FileNotFoundError``) when there is no file, and
    ``CheckpointError`` naming the file when it is corrupted, truncated, or holds objects
    ``weights_only`` refuses.
    """
    target = Path(path)
    try:
        return torch.load(target, map_location=map_location, weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"no checkpoint at {str(target)!r}: check the path, or start from scratch when "
            f"this is the run's first start (test path.exists() before loading)."
        ) from exc
    except _UNREADABLE as exc:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:
            raise CheckpointError(
                f"checkpoint {str(target)!r} holds objects that torch.load(weights_only=True) "
                f"refuses to unpickle ({refused.group(1)}): save state_dict()s and plain "
                f"values (tensors, numbers, strings, lists, dicts), not modules, optimizers "
                f"or custom classes. If you trust the file, read it with "
                f"torch.load(path, weights_only=False) yourself."
            ) from exc
        size = target.stat().st_size if target.exists() else 0
        detail = str(exc).split(". ")[0].splitlines()[0] if str(exc).strip() else "no data"
        raise CheckpointError(
            f"checkpoint {str(target)!r} ({size} bytes) is corrupted or truncated and cannot "
            f"be read ({type(exc).__name__}: {detail}). "
            f"Resume from an earlier checkpoint, or start fresh; write checkpoints with "
            f"accumfn.checkpoint.save_checkpoint, which never leaves a partial file."
        ) from exc
