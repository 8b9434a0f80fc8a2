"""bg: Boltzmann generators in PyTorch Lightning.

Subpackages (dependencies point one way): ``bg.systems``, ``bg.energy``, ``bg.coordinates``
← flows ← models ← ``callbacks``/``datamodules`` ← ``bg.cli``.
"""

__version__ = "0.1.0"


def load_generator(ckpt_path, map_location="cpu", strict=True, weights="averaged"):
    """Load a trained generator from a checkpoint (see ``bg.models.loading.load_generator``)."""
    from bg.models.loading import load_generator as _load

    return _load(ckpt_path, map_location=map_location, strict=strict, weights=weights)


def evaluate(source, n=20000, reference=None, topology=None, **options):
    """Numbers with error bars for a generator (checkpoint path or module) or a ``predict`` samples folder,
    beside a reference MD (see :func:`bg.report.evaluate`); no Trainer involved."""
    from bg.report import evaluate as _evaluate

    return _evaluate(source, n, reference, topology, **options)
