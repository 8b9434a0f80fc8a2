"""Checkpoints that survive faults: atomic writes and finding the checkpoint to resume.

``AtomicCheckpointIO`` writes ``<name>.tmp-<pid>`` next to the target, fsyncs it and renames it over
the target (``os.replace``, atomic on POSIX within one file system). Lightning's default goes through
fsspec, which stages the file in the system temp directory and *moves* it; when that directory is on
another file system (a node-local /tmp, checkpoints on a shared disk) the move is a copy into the
target, and a kill during the copy leaves a truncated ``last.ckpt``.

``find_last_checkpoint`` implements ``--ckpt_path last`` across runs: every run logs into its own
folder (``<save_dir>/<name>/<run id>/checkpoints``), so the newest ``last*.ckpt`` of the same generator
class, molecule and model settings under the logger's root is the one to continue (settings that a
resumed run may change, such as the learning rate or sampling batch sizes, are not compared).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic for local paths (see module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.tmp-<pid>`` files left by a process killed during a save (its pid is gone)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            continue


def checkpoint_summary(path: str | Path) -> dict[str, Any]:
    """Class, molecule, step and epoch stored in a bg checkpoint (memory-mapped: the weights are not read)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    system = ckpt.get("bg_system") or {}
    return dict(path=str(path), bg_class=ckpt.get("bg_class"), molecule=system.get("name"),
                global_step=ckpt.get("global_step"), epoch=ckpt.get("epoch"),
                hyper_parameters=dict(ckpt.get("hyper_parameters") or {}))


#: version of bg's checkpoint layout: 1 (no ``bg_format`` entry) held the flow and the representation as
#: ``flow.*`` / ``representation.*``; 2 holds them inside the Cartesian density (``density.*``)
CHECKPOINT_FORMAT = 2


def upgrade_state_dict(state_dict: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    """A state dict with the key prefixes ``renames`` (old → new) replaced, in order; keys that already carry
    a new prefix, or no old one, are kept as they are."""
    new_prefixes = tuple(renames.values())
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(new_prefixes):
            old = next((p for p in renames if key.startswith(p)), None)
            key = renames[old] + key[len(old):] if old is not None else key
        out[key] = value
    return out


#: model settings a resumed run may change; every other hyper-parameter must match to resume
RESUME_MAY_CHANGE = frozenset({"lr", "weight_decay", "loss_weights", "energy_backend", "energy_compile",
                               "energy_workers", "energy_cut", "sample_batch_size", "predict_samples",
                               "max_skipped_in_a_row"})


def find_last_checkpoint(roots: list[Path], bg_class: str | None = None, molecule: str | None = None,
                         hyper_parameters: dict[str, Any] | None = None) -> dict | None:
    """The newest ``*/checkpoints/last*.ckpt`` under ``roots`` written for ``bg_class``, ``molecule`` and
    ``hyper_parameters`` (except ``RESUME_MAY_CHANGE``; None: any), as ``checkpoint_summary``; None when
    there is none. Unreadable files are skipped."""
    found = [p for root in roots if root.is_dir() for p in root.glob("*/checkpoints/last*.ckpt")]
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            info = checkpoint_summary(path)
        except Exception:  # a foreign or damaged file: not ours to resume
            continue
        if bg_class is not None and info["bg_class"] != bg_class:
            continue
        if molecule is not None and info["molecule"] != molecule:
            continue
        if hyper_parameters is not None:
            keys = (set(hyper_parameters) | set(info["hyper_parameters"])) - RESUME_MAY_CHANGE
            if any(hyper_parameters.get(k) != info["hyper_parameters"].get(k) for k in keys):
                continue
        return info
    return None
