"""Data for transferable generators: MD of many capped peptides, one cache with a manifest.

A :class:`PeptideSet` names the peptides (an explicit list, every capped single residue Ace-X-Nme, or
random capped dipeptides Ace-X-Y-Nme) and how they split **by sequence** into train/val/test, so a
held-out peptide is never seen in training. :func:`make_peptide_set` builds each peptide
(``bg.systems.build_capped_peptide``), runs its MD (``bg.systems.simulate``, resumable) with one
process per core, and writes ``<cache_dir>/peptide_sets/<name>/manifest.json``: per peptide the
sequence, split, force field, atoms, frames, frame interval, statistical inefficiency g of its
backbone torsions and the effective frames. Each peptide's MD sits where ``MDDataModule`` caches
``system: peptide:<SEQ>`` with the same MD settings (``<cache_dir>/ace-<seq>-nme/md``), so any one
of them loads as a single-molecule dataset too.

    bg data --peptide-set configs/peptide_sets/single_residues.yaml
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bg.choices import check_choices
from bg.systems.peptide import ONE_TO_THREE
from bg.systems.simulate import MDSettings

PeptideSetKind = Literal["list", "capped_single", "random_dipeptides"]
SPLITS = ("train", "val", "test")
AMINO_ACIDS = "".join(sorted(ONE_TO_THREE))  # one-letter codes of the 20 standard amino acids


@dataclass(frozen=True)
class PeptideSet:
    """Which peptides, and which of them each split holds.

    Args:
        name: the set's name (its folder under ``<cache_dir>/peptide_sets``).
        kind: ``"list"`` (``sequences`` as given), ``"capped_single"`` (Ace-X-Nme for every standard amino
            acid X, or for the letters in ``sequences`` when given), ``"random_dipeptides"`` (``n_random``
            distinct Ace-X-Y-Nme drawn with ``seed``).
        sequences: one-letter sequences (``"list"``), or the residue letters (``"capped_single"``).
        n_random: how many dipeptides ``"random_dipeptides"`` draws (≤ 400).
        n_val, n_test: how many peptides the val and test splits hold (drawn with ``seed``; the rest train).
        test: sequences that must be in the test split (they count towards ``n_test``).
        seed: seeds the draws and the split.
        forcefield: preset or OpenMM XML files (``bg.systems.FORCEFIELDS``).
        temperature: K.
    """

    name: str = "peptides"
    kind: PeptideSetKind = "list"
    sequences: tuple[str, ...] = ()
    n_random: int = 0
    n_val: int = 0
    n_test: int = 0
    test: tuple[str, ...] = ()
    seed: int = 0
    forcefield: str = "amber14-obc2"
    temperature: float = 300.0

    def __post_init__(self) -> None:
        check_choices(PeptideSet, dict(kind=self.kind), "peptide set ")
        object.__setattr__(self, "sequences", tuple(s.upper() for s in self.sequences))
        object.__setattr__(self, "test", tuple(s.upper() for s in self.test))
        for seq in self.sequences + self.test:
            bad = sorted(set(seq) - set(AMINO_ACIDS))
            if not seq or bad:
                raise ValueError(f"peptide set {self.name!r}: {seq!r} is not a one-letter amino-acid sequence"
                                 + (f" ({', '.join(bad)} unknown; use {AMINO_ACIDS})" if bad else ""))
        if self.kind == "random_dipeptides" and not 0 < self.n_random <= len(AMINO_ACIDS) ** 2:
            raise ValueError(f"peptide set {self.name!r}: random_dipeptides needs 1 ≤ n_random ≤ 400, got {self.n_random}")
        if self.kind == "list" and not self.sequences:
            raise ValueError(f"peptide set {self.name!r}: kind 'list' needs sequences")
        if self.n_val < 0 or self.n_test < 0:
            raise ValueError(f"peptide set {self.name!r}: n_val and n_test must be ≥ 0")

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> "PeptideSet":
        """From a YAML/JSON mapping (lists become tuples); unknown keys are an error naming the known ones."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"peptide set: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
        return cls(**spec)

    def expand(self) -> list[str]:
        """The peptides' one-letter sequences (without caps), in a fixed order, duplicates dropped."""
        if self.kind == "list":
            seqs = list(self.sequences)
        elif self.kind == "capped_single":
            seqs = list(self.sequences or AMINO_ACIDS)
            if any(len(s) != 1 for s in seqs):
                raise ValueError(f"peptide set {self.name!r}: capped_single takes single letters, got {seqs}")
        else:
            pairs = [a + b for a in AMINO_ACIDS for b in AMINO_ACIDS]
            seqs = sorted(random.Random(self.seed).sample(pairs, self.n_random))
        seqs = list(dict.fromkeys(seqs + [s for s in self.test if s not in seqs]))
        if self.n_val + max(self.n_test, len(self.test)) >= len(seqs):
            raise ValueError(f"peptide set {self.name!r}: {len(seqs)} peptides leave none to train on with "
                             f"n_val {self.n_val} and n_test {max(self.n_test, len(self.test))}")
        return seqs

    def split(self) -> dict[str, list[str]]:
        """``{"train": [...], "val": [...], "test": [...]}``: disjoint, covering :meth:`expand`; the ``test``
        sequences first, the rest of val/test drawn with ``seed``."""
        seqs = self.expand()
        rest = [s for s in seqs if s not in self.test]
        random.Random(self.seed + 1).shuffle(rest)
        n_more = max(0, self.n_test - len(self.test))
        test = list(self.test) + rest[:n_more]
        val = rest[n_more:n_more + self.n_val]
        held = set(test) | set(val)
        return {"train": [s for s in seqs if s not in held], "val": sorted(val), "test": sorted(test)}


def read_spec(path: str | Path) -> tuple[PeptideSet, MDSettings]:
    """A peptide-set spec file (YAML: ``PeptideSet`` fields and an ``md:`` section of ``MDSettings``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such peptide-set spec (see configs/peptide_sets/*.yaml)")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a peptide-set spec is a mapping of PeptideSet fields (and md:), got {type(spec).__name__}")
    md = spec.pop("md", None) or {}
    known = set(MDSettings.__dataclass_fields__)
    if set(md) - known:
        raise ValueError(f"{path}: unknown md setting(s) {', '.join(sorted(set(md) - known))}; known: "
                         f"{', '.join(sorted(known))}")
    return PeptideSet.from_dict(spec), MDSettings(**md)


def peptide_name(sequence: str) -> str:
    """The system name ``build_capped_peptide`` gives (and ``MDDataModule`` caches under)."""
    return f"ace-{sequence.lower()}-nme"


def manifest_path(cache_dir: str | Path, name: str) -> Path:
    return Path(cache_dir) / "peptide_sets" / name / "manifest.json"


def torsion_inefficiency(xyz: np.ndarray, topology) -> float:
    """Largest statistical inefficiency g (frames) over cos and sin of every backbone φ and ψ of a
    trajectory ``(F, N, 3)`` nm: the slowest of the motions a flow must get right."""
    import mdtraj as md

    from bg.estimators import statistical_inefficiency

    traj = md.Trajectory(xyz, topology)
    angles = np.concatenate([md.compute_phi(traj)[1], md.compute_psi(traj)[1]], axis=1)
    series = [f(a) for a in angles.T for f in (np.cos, np.sin)]
    return max((statistical_inefficiency(s) for s in series), default=1.0)


def _one_peptide(sequence: str, cache_dir: str, forcefield: str, temperature: float, md_settings: dict) -> dict:
    """Build, simulate (or resume) and summarise one peptide (runs in a worker process)."""
    from bg.quiet import quiet_c_output
    from bg.systems.builtin import get_system
    from bg.systems.simulate import load_md, simulate

    start = time.time()
    system = get_system(f"peptide:{sequence}", temperature=temperature, forcefield=forcefield)
    out = Path(cache_dir) / peptide_name(sequence) / "md"
    settings = MDSettings(**md_settings)
    simulate(system, out, settings, progress=False)
    with quiet_c_output():  # mdtraj's DCD reader prints a line per file
        traj = load_md(out)
    g = torsion_inefficiency(traj.xyz, traj.topology)
    return {"sequence": sequence, "name": system.name, "forcefield": list(system.forcefield),
            "temperature": system.temperature, "n_atoms": system.n_atoms, "frames": traj.n_frames,
            "frame_interval_ps": settings.frame_interval_ps, "statistical_inefficiency": g,
            "effective_frames": traj.n_frames / g, "md_dir": str(out.relative_to(cache_dir)),
            "seconds": time.time() - start}


def _atomic_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def make_peptide_set(spec: PeptideSet, cache_dir: str | Path = "data", md: MDSettings | None = None,
                     workers: int | None = None, progress: bool = True) -> dict:
    """MD of every peptide of ``spec`` (resumable; one process per worker, one OpenMM thread each) and the
    manifest; returns the manifest (also written to :func:`manifest_path`, updated as peptides finish).

    Args:
        spec: the peptides and their split.
        cache_dir: cache root (each peptide's MD in ``<cache_dir>/ace-<seq>-nme/md``).
        md: MD settings of every peptide (``MDSettings``; its ``threads`` is set to 1 per worker).
        workers: processes (default: the number of cores).
    """
    from tqdm.auto import tqdm

    from bg.systems.system import resolve_forcefield

    resolve_forcefield(spec.forcefield)  # an unknown force field fails here, not in every worker
    cache_dir = Path(cache_dir)
    md = replace(md or MDSettings(), threads=1)
    splits = spec.split()
    split_of = {s: k for k, seqs in splits.items() for s in seqs}
    path = manifest_path(cache_dir, spec.name)
    manifest: dict = {"spec": asdict(spec), "md": asdict(md), "splits": splits, "peptides": {}}
    if path.exists():
        old = json.loads(path.read_text())
        # settings added to MDSettings after a set was made are read as their defaults (what that MD ran with)
        recorded = {**asdict(MDSettings()), "threads": 1, **(old.get("md") or {})}
        if recorded != manifest["md"] or old.get("spec", {}).get("forcefield") != spec.forcefield:
            raise ValueError(f"{path} was made with other MD settings or force field; use another set name or "
                             "cache_dir, or remove the folder to start again")
        manifest["peptides"] = {s: e for s, e in old.get("peptides", {}).items() if s in split_of}
    todo = [s for s in spec.expand() if s not in manifest["peptides"]]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    bar = tqdm(total=len(split_of), initial=len(split_of) - len(todo), desc=f"peptide set {spec.name}",
               unit="peptide", disable=not progress)
    args = (str(cache_dir), spec.forcefield, spec.temperature, asdict(md))
    if todo:
        import multiprocessing as mp

        failed: dict[str, str] = {}
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            jobs = {pool.submit(_one_peptide, s, *args): s for s in todo}
            for job in as_completed(jobs):
                try:
                    entry = job.result()
                except Exception as exc:  # one peptide's failure must not lose the others' MD
                    failed[jobs[job]] = f"{type(exc).__name__}: {exc}"
                    continue
                entry["split"] = split_of[entry["sequence"]]
                manifest["peptides"][entry["sequence"]] = entry
                _atomic_json(path, manifest)
                bar.set_postfix_str(f"{entry['sequence']}: g {entry['statistical_inefficiency']:.0f}")
                bar.update(1)
        if failed:
            bar.close()
            raise RuntimeError(f"peptide set {spec.name}: {len(failed)} peptide(s) failed (the others are kept and a "
                               "rerun resumes): " + "; ".join(f"{s}: {why}" for s, why in failed.items()))
    bar.close()
    for seq, entry in manifest["peptides"].items():  # a changed split of a resumed set
        entry["split"] = split_of[seq]
    manifest["peptides"] = {s: manifest["peptides"][s] for s in spec.expand()}
    _atomic_json(path, manifest)
    return json.loads(path.read_text())


def load_manifest(cache_dir: str | Path, name: str) -> dict:
    """The manifest :func:`make_peptide_set` wrote (an error naming the command when there is none)."""
    path = manifest_path(cache_dir, name)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no peptide set {name!r} here; make it with `bg data --peptide-set <spec.yaml>`")
    return json.loads(path.read_text())


def manifest_rows(manifest: dict):
    """``(split, sequence, entry or None)`` for every peptide of a manifest, split by split (None: not made yet)."""
    for split in SPLITS:
        for seq in manifest["splits"][split]:
            yield split, seq, manifest["peptides"].get(seq)


def format_manifest(manifest: dict) -> str:
    """A table of the set: split, sequence, atoms, frames, g and effective frames per peptide."""
    rows = [f"{'split':<6} {'peptide':<14} {'atoms':>5} {'frames':>7} {'g':>7} {'effective':>9}"]
    for split, seq, e in manifest_rows(manifest):
        if e is None:
            rows.append(f"{split:<6} {peptide_name(seq):<14} (not made yet)")
            continue
        rows.append(f"{split:<6} {e['name']:<14} {e['n_atoms']:>5} {e['frames']:>7} "
                    f"{e['statistical_inefficiency']:>7.1f} {e['effective_frames']:>9.0f}")
    counts = ", ".join(f"{k} {len(v)}" for k, v in manifest["splits"].items())
    total = sum(e.get("seconds", 0.0) for e in manifest["peptides"].values())
    rows.append(f"{len(manifest['peptides'])} peptides ({counts}); MD {total / 60:.1f} CPU-min in all")
    return "\n".join(rows)


def effective_stride(manifest: dict) -> int:
    """A stride that keeps frames about one statistical inefficiency apart for the slowest training peptide
    (``ceil(max g)``); use it when frames are many and memory or epochs matter."""
    gs = [e["statistical_inefficiency"] for s, e in manifest["peptides"].items() if e.get("split") == "train"]
    return int(math.ceil(max(gs, default=1.0)))


__all__ = ["AMINO_ACIDS", "PeptideSet", "PeptideSetKind", "effective_stride", "format_manifest", "load_manifest",
           "make_peptide_set", "manifest_path", "peptide_name", "torsion_inefficiency"]
