"""Load a trained generator for notebooks and scripts: ``bg.load_generator(path)``."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Literal

import torch

from bg.models.base import BoltzmannGenerator


def load_generator(ckpt_path: str | Path, map_location: str | torch.device = "cpu",
                   strict: bool = True, weights: Literal["averaged", "training"] = "averaged") -> BoltzmannGenerator:
    """The generator saved in a Lightning checkpoint, in eval mode, ready to ``sample`` and ``energy``.

    The molecule (topology, force field, temperature) travels inside the checkpoint, so neither the
    config nor the MD data are needed. ``model.sample(n) -> (x, log_q)``: x ``(n, N, 3)`` nm,
    log_q the Cartesian log density; ``model.energy(x)``: reduced energy in kT; ``model.topology``:
    the mdtraj topology.

    ``weights``: a run trained with a weight-averaging callback (Lightning's ``EMAWeightAveraging``) saves
    the averaged weights as the model's and the optimizer's own under ``current_model_state``;
    ``"averaged"`` loads the former, ``"training"`` the latter. Without averaging both are the same weights.
    """
    if weights not in ("averaged", "training"):
        raise ValueError(f"weights={weights!r}: choose 'averaged' or 'training'")
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if "bg_class" not in ckpt:
        raise ValueError(f"{path}: not a bg generator checkpoint (no 'bg_class' entry)")
    module, _, name = ckpt["bg_class"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    model = cls.load_from_checkpoint(path, map_location=map_location, strict=strict)
    if weights == "training" and "current_model_state" in ckpt:
        model.load_state_dict(ckpt["current_model_state"], strict=strict)
    return model.eval()
