"""Lightning callbacks: loss-stage schedule, sample evaluation and figures, sample writer, preemption.

By design a callback never builds a flow: it calls the generator's public API (``sample``,
``proposal``, ``energy``, ``loss_weights``) and ``bg.evaluation``.
"""

from callbacks.evaluation import SampleEvaluation
from callbacks.molecules import MoleculeEvaluation
from callbacks.preemption import PreemptionCheckpoint
from callbacks.stages import LossStages, Stage
from callbacks.writer import SampleWriter

__all__ = ["LossStages", "MoleculeEvaluation", "PreemptionCheckpoint", "SampleEvaluation", "SampleWriter", "Stage"]
