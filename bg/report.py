"""``bg.evaluate``: a generator's samples turned into numbers with error bars, beside a reference (MD).

    import bg
    report = bg.evaluate("runs/bg/<id>/checkpoints/last.ckpt", n=20000,
                         reference=["md/walker_00.dcd", "md/walker_01.dcd"], topology="md/topology.pdb")
    print(report.markdown()); report.save("analysis/")     # report.json, report.md, figures

What it reports (see :mod:`bg.estimators` for how the error bars are made):

- sampling: Kish ESS/n of the importance weights with a bootstrap interval (the energy that judged them
  is named); for SMC particles (a ``predict`` samples folder) the sampler's own statistics instead — no
  headline ESS after resampling, the distinct proposals behind the particles, log Z — and a warning when
  fewer than 10 % of the particles have distinct ancestors;
- states: populations and free-energy differences ΔF = −ln(p_s / p_first) (kT and kcal/mol) — by default
  the four φ/ψ basins of a single-residue peptide (:data:`bg.analysis.BASINS`), or any
  ``(name list, function of an mdtraj.Trajectory → (F,) labels)``;
- observables: weighted means of any function of an ``mdtraj.Trajectory`` → ``(F,)`` (defaults for
  proteins with a native structure: RMSD, fraction of native contacts Q, radius of gyration);
- surfaces: 1-D free-energy profiles of every observable and, for peptides, 2-D φ/ψ surfaces (one per
  residue, up to ``max_residues``), each bin with its error;
- the same for the reference, with MD error bars (statistical inefficiency per trajectory), and per
  quantity the difference and its z-score; a difference map for each surface;
- structure (proteins and peptides, :class:`Structure`): sample energies beside the MD's (median and
  5–95 % range, raw and reweighted; for a model that freezes coordinates, e.g. reduced internal
  coordinates, also the MD frames projected onto the model's coordinates, the fair energy reference), the
  distance distortion ΔD of heavy backbone atoms, and Cα contact maps with their difference.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import mdtraj as md
import numpy as np
import torch
from torch import Tensor

from bg.analysis import (BASINS, CONTACT_CUTOFF, alpha_carbons, backbone_pairs, basin_index, contact_map,
                         phi_psi_atoms, torsions)
from bg.estimators import (KCAL_PER_MOL_PER_K, Estimate, SampleSet, compare, free_energy_differences,
                           free_energy_surface, populations)
from bg.metrics import pairwise_distances
from bg.quiet import quiet_c_output
from bg.sampling.ess import kish_ess
from bg.sampling.proposal import batched
from bg.sampling.smc import COLLAPSE_FRACTION, collapsed

Observable = Callable[[md.Trajectory], np.ndarray]
#: per-frame state labels ``(F,)`` in 0 … len(names) − 1 (−1: in no state)
StateLabels = Callable[[md.Trajectory], np.ndarray]
EnergyChoice = Literal["model", "torch", "openmm"]


def basin_states(topology: md.Topology) -> tuple[list[str], StateLabels] | None:
    """The four φ/ψ basins of a peptide with one φ/ψ residue (alanine dipeptide and the like); else None."""
    phi_psi = _phi_psi_atoms(topology)
    if phi_psi is None or len(phi_psi[0]) != 1:
        return None
    phi_q, psi_q = phi_psi

    def label(traj: md.Trajectory) -> np.ndarray:
        x = torch.as_tensor(traj.xyz, dtype=torch.float64)
        return basin_index(torsions(x, phi_q)[:, 0], torsions(x, psi_q)[:, 0]).numpy()

    return list(BASINS), label


def _phi_psi_atoms(topology: md.Topology) -> tuple[Tensor, Tensor] | None:
    """φ/ψ atom quadruples per residue, or None for a molecule without backbone torsions."""
    try:
        return phi_psi_atoms(topology)
    except ValueError:
        return None


def matched_atoms(native: md.Topology, other: md.Topology, atoms: np.ndarray) -> np.ndarray:
    """Indices in ``other`` of the ``native`` atoms ``atoms``, matched by residue position and atom name, so that
    a native structure from another file (another atom order, hydrogens named alike) works; an error names
    the first atom that has no match."""
    where = {(a.residue.index, a.name): a.index for a in other.atoms}
    out = []
    for i in atoms:
        atom = native.atom(int(i))
        j = where.get((atom.residue.index, atom.name))
        if j is None:
            raise ValueError(f"native atom {atom} (residue {atom.residue.index + 1}) has no atom of that name in the "
                             f"samples' topology; give a native structure of the same molecule")
        out.append(j)
    return np.asarray(out)


def rmsd_to(native: md.Trajectory) -> Observable:
    """RMSD (nm) of the backbone heavy atoms to ``native`` after optimal superposition."""
    atoms = native.topology.select("backbone")

    def rmsd(traj: md.Trajectory) -> np.ndarray:
        mapped = matched_atoms(native.topology, traj.topology, atoms)
        # in the samples' atom order, so that mdtraj's float32 sums (≈3e-4 nm at zero RMSD) do not depend on
        # the order of atoms in the native file
        order = np.argsort(mapped)
        return md.rmsd(traj, native, 0, atom_indices=mapped[order], ref_atom_indices=atoms[order])

    return rmsd


def native_contacts(native: md.Trajectory, beta: float = 50.0, lam: float = 1.8, cutoff: float = 0.45) -> Observable:
    """Fraction of native contacts Q (Best, Hummer & Eaton 2013): heavy-atom pairs > 3 residues apart
    closer than ``cutoff`` nm in ``native``, each counted smoothly as 1 / (1 + exp(β (r − λ r₀)))."""
    heavy = native.topology.select_atom_indices("heavy")
    pairs = np.array([(i, j) for k, i in enumerate(heavy) for j in heavy[k + 1:]
                      if abs(native.topology.atom(i).residue.index - native.topology.atom(j).residue.index) > 3])
    r0 = md.compute_distances(native[0], pairs)[0]
    pairs, r0 = pairs[r0 < cutoff], r0[r0 < cutoff]

    def q(traj: md.Trajectory) -> np.ndarray:
        mapped = matched_atoms(native.topology, traj.topology, pairs.ravel()).reshape(pairs.shape)
        return np.mean(1.0 / (1.0 + np.exp(beta * (md.compute_distances(traj, mapped) - lam * r0))), axis=1)

    return q


def radius_of_gyration(traj: md.Trajectory) -> np.ndarray:
    """Radius of gyration (nm) of every frame, mass-weighted about the centre of mass (``mdtraj.compute_rg``
    centres on the unweighted centroid, which differs by ~3e-4 relative for a protein)."""
    masses = np.array([a.element.mass for a in traj.topology.atoms])
    xyz = traj.xyz.astype(np.float64)
    com = np.einsum("fai,a->fi", xyz, masses) / masses.sum()
    return np.sqrt(np.einsum("fa,a->f", ((xyz - com[:, None]) ** 2).sum(-1), masses) / masses.sum())


@dataclass
class Surface:
    """A free-energy surface: bin edges per dimension, and per sample set F (kT, lowest bin 0) and its error."""

    name: str
    edges: list[list[float]]
    values: dict[str, np.ndarray] = field(default_factory=dict)
    errors: dict[str, np.ndarray] = field(default_factory=dict)

    def as_dict(self) -> dict:
        clean = lambda a: [None if not math.isfinite(v) else float(v) for v in np.ravel(a)]  # noqa: E731
        return {"name": self.name, "edges": self.edges, "shape": list(next(iter(self.values.values())).shape),
                "values": {k: clean(v) for k, v in self.values.items()},
                "errors": {k: clean(v) for k, v in self.errors.items()}}


#: the reference MD frames after a round trip through the model's coordinates (frozen ones at their means)
PROJECTED = "reference on the model's coordinates"


def weighted_quantiles(values: np.ndarray, q: Sequence[float], log_w: np.ndarray | None = None) -> list[float]:
    """Quantiles ``q`` of the finite ``values`` ``(n,)``, self-normalised weighted with ``log_w`` ``(n,)``
    (non-finite weights count as 0): the smallest value whose cumulative weight reaches each q."""
    v = np.asarray(values, dtype=float)
    lw = np.zeros_like(v) if log_w is None else np.asarray(log_w, dtype=float)
    ok = np.isfinite(v) & np.isfinite(lw)
    if not ok.any():
        return [math.nan] * len(q)
    v, lw = v[ok], lw[ok]
    order = np.argsort(v)
    w = np.exp(lw[order] - lw.max())
    cum = np.cumsum(w) / w.sum()
    return [float(v[order][min(np.searchsorted(cum, x), len(v) - 1)]) for x in q]


@dataclass
class Structure:
    """Energies (kT), backbone distance distortion ΔD (nm) and Cα contact maps of generated frames beside
    the reference. ``energies``: per set (``generator``, ``generator (reweighted)``, ``reference``,
    :data:`PROJECTED`) the median, 5 % and 95 % quantiles and the finite fraction; ``distance_distortion``:
    ``raw`` and ``reweighted``; ``contacts``: per set an ``(R, R)`` matrix of contact probabilities (Cα–Cα
    below ``contact_cutoff`` nm) over ``residues``."""

    energies: dict[str, dict[str, float]]
    distance_distortion: dict[str, float]
    contacts: dict[str, np.ndarray]
    contact_cutoff: float
    residues: list[str]
    energy_values: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    log_w: np.ndarray | None = field(default=None, repr=False)

    def contact_difference(self, key: str = "generator") -> dict[str, float]:
        """Mean and largest |p_key − p_reference| over residue pairs (i < j)."""
        if key not in self.contacts or "reference" not in self.contacts:
            return {}
        i, j = np.triu_indices(len(self.residues), k=1)
        d = np.abs(self.contacts[key] - self.contacts["reference"])[i, j]
        return {"mean_abs": float(np.mean(d)), "max_abs": float(np.max(d))} if len(d) else {}

    def as_dict(self) -> dict:
        return {"energies_kT": self.energies, "distance_distortion_nm": self.distance_distortion,
                "contact_cutoff_nm": self.contact_cutoff, "residues": self.residues,
                "contacts": {k: v.tolist() for k, v in self.contacts.items()},
                "contact_difference": {k: self.contact_difference(k) for k in self.contacts if k != "reference"}}

    def markdown(self) -> list[str]:
        lines = []
        if self.energies:
            lines += ["", "| energies (kT) | median | 5–95 % | finite |", "|---|---|---|---|"]
            for name, e in self.energies.items():
                lines.append(f"| {name} | {e['median']:.1f} | {e['q05']:.1f} – {e['q95']:.1f} | "
                             f"{e['finite_fraction']:.3f} |")
            if PROJECTED in self.energies:
                lines.append(f"\nThe model holds some coordinates fixed (e.g. reduced internal coordinates); "
                             f"its fair energy reference is the MD frames with those coordinates set the same way "
                             f"({PROJECTED}).")
        if self.distance_distortion:
            dd = self.distance_distortion
            lines.append(f"\nΔD (heavy backbone atom distances, nm): {dd['raw']:.4f} raw, "
                         f"{dd['reweighted']:.4f} reweighted.")
        for key in ("generator", "generator (reweighted)"):
            diff = self.contact_difference(key)
            if diff:
                lines.append(f"\nContacts ({key}; Cα–Cα < {self.contact_cutoff:g} nm, {len(self.residues)} residues): "
                             f"mean |Δp| {diff['mean_abs']:.4f}, largest {diff['max_abs']:.3f} against the reference.")
        return lines

    def figures(self) -> dict[str, Any]:
        """``{file stem: matplotlib figure}``: the energy histogram and the contact maps."""
        from bg import plots

        out = {}
        u = self.energy_values
        if "generator" in u and "reference" in u:
            others = {PROJECTED: u[PROJECTED]} if PROJECTED in u else None
            out["energies"] = plots.energy_histogram(torch.as_tensor(u["reference"]), torch.as_tensor(u["generator"]),
                                                     None if self.log_w is None else torch.as_tensor(self.log_w),
                                                     others=others)
        if "reference" in self.contacts and len(self.contacts) > 1:
            out["contacts"] = plots.contact_maps(self.contacts, self.residues, self.contact_cutoff)
        return out


@dataclass
class Report:
    """Numbers with error bars for a generator (``"generator"``) and, when given, the reference
    (``"reference"``); every value an :class:`~bg.estimators.Estimate`. See the module docstring."""

    label: str
    n_samples: int
    energy: str
    temperature: float
    sampling: dict[str, Any]
    states: list[str]
    populations: dict[str, list[Estimate]]
    free_energies: dict[str, list[Estimate]]
    observables: dict[str, dict[str, Estimate]]
    surfaces: list[Surface]
    warnings: list[str]
    reference_frames: int = 0
    structure: Structure | None = None

    def comparisons(self) -> dict[str, dict[str, float]]:
        """Generator − reference difference and z-score of every population, ΔF and observable mean."""
        out = {}
        if "reference" not in self.populations and not any("reference" in v for v in self.observables.values()):
            return out
        for kind, table in (("population", self.populations), ("ΔF", self.free_energies)):
            if "reference" in table:
                for name, a, b in zip(self.states, table["generator"], table["reference"]):
                    out[f"{kind} {name}"] = compare(a, b)
        for name, pair in self.observables.items():
            if "reference" in pair:
                out[f"mean {name}"] = compare(pair["generator"], pair["reference"])
        return out

    def as_dict(self) -> dict:
        est = lambda items: [e.as_dict() for e in items]  # noqa: E731
        return {
            "label": self.label, "n_samples": self.n_samples, "energy": self.energy, "temperature_K": self.temperature,
            "reference_frames": self.reference_frames, "sampling": self.sampling, "states": self.states,
            "populations": {k: est(v) for k, v in self.populations.items()},
            "free_energies_kT": {k: est(v) for k, v in self.free_energies.items()},
            "observables": {n: {k: e.as_dict() for k, e in v.items()} for n, v in self.observables.items()},
            "comparisons": self.comparisons(), "surfaces": [s.as_dict() for s in self.surfaces],
            "warnings": self.warnings,
            "structure": self.structure.as_dict() if self.structure is not None else None,
        }

    def markdown(self) -> str:
        kcal = KCAL_PER_MOL_PER_K * self.temperature
        s = self.sampling
        lines = [f"# {self.label}", "",
                 f"{self.n_samples} samples, energies from {self.energy}, {self.temperature:g} K"
                 + (f"; reference: {self.reference_frames} MD frames (errors from their statistical inefficiency)"
                    if self.reference_frames else "") + ".", ""]
        if "ess" in s:
            e = Estimate(**s["ess"])
            lines.append(f"Kish ESS/n {e.value:.4f} (95 % bootstrap interval {e.low:.4f}–{e.high:.4f}; "
                         f"{e.value * self.n_samples:.0f} effective samples).")
        else:
            lines.append(f"{s.get('sampler', 'sampler')} particles: ESS/n before the last resampling "
                         f"{s.get('ess_before_resampling', math.nan):.4f}; {s.get('n_ancestors', '?')} distinct proposals "
                         f"behind the particles; log Z {s.get('log_z', math.nan):.3f}.")
        lines += [f"> warning: {w}" for w in self.warnings]
        comp = self.comparisons()
        if self.states:
            sets = list(self.populations)
            head = "| state | " + " | ".join(f"population ({k})" for k in sets) + " | " + " | ".join(
                f"ΔF kT ({k})" for k in sets) + f" | ΔF kcal/mol ({sets[0]}) |" + (" z (pop.) |" if comp else "")
            lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
            for i, name in enumerate(self.states):
                row = [self.populations[k][i].format() for k in sets] + [self.free_energies[k][i].format() for k in sets]
                f = self.free_energies[sets[0]][i]
                row.append(Estimate(f.value * kcal, f.error * kcal, f.low * kcal, f.high * kcal, f.reliable).format())
                if comp:
                    row.append(f"{comp[f'population {name}']['z']:+.1f}")
                lines.append(f"| {name} | " + " | ".join(row) + " |")
            lines.append(f"\nΔF relative to {self.states[0]}.")
        if self.observables:
            sets = list(next(iter(self.observables.values())))
            lines += ["", "| observable (mean) | " + " | ".join(sets) + (" | z |" if comp else " |"),
                      "|---|" + "---|" * (len(sets) + bool(comp))]
            for name, pair in self.observables.items():
                z = f" {comp[f'mean {name}']['z']:+.1f} |" if comp else ""
                lines.append(f"| {name} | " + " | ".join(pair[k].format() for k in sets) + " |" + z)
        if self.structure is not None:
            lines += self.structure.markdown()
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | Path, figures: bool = True) -> list[Path]:
        """Write ``report.json``, ``report.md`` and (``figures``) one PNG per surface into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(_json_safe(self.as_dict()), indent=1, allow_nan=False))
        paths = [out / "report.json", out / "report.md"]
        md_text = self.markdown()
        if figures:
            from bg import plots

            for surface in self.surfaces:
                fig = plots.free_energy_surface(surface)
                path = out / f"surface_{surface.name.replace(' ', '_').replace('/', '_')}.png"
                fig.savefig(path, dpi=110)
                plots.close(fig)
                paths.append(path)
                md_text += f"\n![{surface.name}]({path.name})\n"
            for stem, fig in (self.structure.figures() if self.structure is not None else {}).items():
                path = out / f"{stem}.png"
                fig.savefig(path, dpi=110)
                plots.close(fig)
                paths.append(path)
                md_text += f"\n![{stem}]({path.name})\n"
        (out / "report.md").write_text(md_text)
        return paths


def _json_safe(obj: Any) -> Any:
    """Non-finite numbers (empty bins, undefined z-scores) as null: strict JSON has no NaN or Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _label_bins(values: np.ndarray, edges: np.ndarray) -> Tensor:
    k = np.digitize(values, edges) - 1
    k[(k < 0) | (k >= len(edges) - 1) | ~np.isfinite(values)] = -1
    return torch.as_tensor(k, dtype=torch.long)


def _surfaces(sets: dict[str, tuple[md.Trajectory, SampleSet]], observables: dict[str, np.ndarray],
              bins: int, max_residues: int) -> list[Surface]:
    out = []
    first = next(iter(sets.values()))[0]
    phi_q, psi_q = _phi_psi_atoms(first.topology) or (torch.zeros(0, 4, dtype=torch.long),) * 2
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    residues = np.unique(np.linspace(0, len(phi_q) - 1, min(len(phi_q), max_residues)).round().astype(int)) \
        if len(phi_q) else []
    for r in residues:
        res = first.topology.atom(int(phi_q[r, 1])).residue
        surf = Surface(f"phi-psi {res}", [edges.tolist(), edges.tolist()])
        for key, (traj, ss) in sets.items():
            x = torch.as_tensor(traj.xyz, dtype=torch.float64)
            a, b = _label_bins(torsions(x, phi_q[r:r + 1])[:, 0].numpy(), edges), _label_bins(
                torsions(x, psi_q[r:r + 1])[:, 0].numpy(), edges)
            labels = torch.where((a >= 0) & (b >= 0), a * bins + b, -1)
            est, _ = free_energy_surface(labels, bins * bins, ss)
            surf.values[key] = np.array([e.value for e in est]).reshape(bins, bins)
            surf.errors[key] = np.array([e.error for e in est]).reshape(bins, bins)
        out.append(surf)
    for name in observables.get("generator", {}):
        values = {k: v[name] for k, v in observables.items()}
        lo = min(np.nanquantile(v, 0.001) for v in values.values())
        hi = max(np.nanquantile(v, 0.999) for v in values.values())
        e = np.linspace(lo, hi, bins + 1)
        surf = Surface(name, [e.tolist()])
        for key, (_, ss) in sets.items():
            est, _ = free_energy_surface(_label_bins(values[key], e), bins, ss)
            surf.values[key] = np.array([x.value for x in est])
            surf.errors[key] = np.array([x.error for x in est])
        out.append(surf)
    return out


def _judge(model, energy: EnergyChoice) -> tuple[Callable[[Tensor], Tensor], str]:
    """The energy u(x) in kT that judges a generator's samples, and its name."""
    if energy == "model":
        target = getattr(model, "target", None)
        module = type(target.module).__name__ if target is not None else "its energy"
        return model.energy, f"the model's target ({module})"
    from bg.energy import target_energy

    return target_energy(model.system, backend=energy), {"torch": "the torch force field", "openmm": "OpenMM"}[energy]


def _energies(judge: Callable[[Tensor], Tensor], x: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad():
        return batched(judge, x.double(), batch_size).double()


def _draw(model, n: int, energy: EnergyChoice, seed: int, batch_size: int
          ) -> tuple[dict[str, Tensor], str, Callable[[Tensor], Tensor]]:
    """``n`` importance-weighted samples of a generator judged by ``energy``, the judge's name and the judge."""
    torch.manual_seed(seed)
    model.eval()
    judge, name = _judge(model, energy)
    with torch.no_grad():
        out = model.proposal.weigh(n, model.energy)
    if energy != "model":
        u = _energies(judge, out["x"], batch_size).to(out["log_w"])
        out = dict(out, energy_kT=u, log_w=torch.where(torch.isfinite(out["log_w"]), -u - out["log_q"], out["log_w"]))
    return out, name, judge


def _projected(model, x: Tensor, batch_size: int) -> Tensor | None:
    """Frames ``x`` on the model's coordinates (:meth:`BoltzmannGenerator.on_model_coordinates`) when it
    holds some fixed; None otherwise."""
    if not getattr(model, "freezes_coordinates", False):
        return None
    return batched(model.on_model_coordinates, x.double(), batch_size)


def _mean_distances(x: Tensor, pairs: Tensor, log_w: Tensor | None = None, chunk: int = 512) -> Tensor:
    """Mean distances ``(P,)`` of atom pairs over frames ``(F, N, 3)``, self-normalised weighted with
    ``log_w``; frames with a non-finite distance or weight count as weight 0."""
    lw = torch.zeros(len(x), dtype=torch.float64) if log_w is None else log_w.double()
    ok = torch.isfinite(x).flatten(1).all(1) & torch.isfinite(lw)
    if not ok.any():
        return torch.full((len(pairs),), math.nan, dtype=torch.float64)
    w = torch.softmax(torch.where(ok, lw, torch.full_like(lw, -math.inf)), 0)
    total = torch.zeros(len(pairs), dtype=torch.float64)
    for xc, wc, okc in zip(x.split(chunk), w.split(chunk), ok.split(chunk)):
        total += (wc[okc, None] * pairwise_distances(xc[okc].double(), pairs)).sum(0)
    return total


def _structure(traj: md.Trajectory, log_w: Tensor, reference: md.Trajectory | None,
               energies: dict[str, np.ndarray], cutoff: float) -> Structure | None:
    """The :class:`Structure` section: energies as given (``generator``, ``reference``, :data:`PROJECTED`),
    ΔD and contact maps against ``reference`` (contact maps need two residues with a CA atom, ΔD a protein
    backbone). None when there is nothing to report."""
    top = traj.topology
    ca = alpha_carbons(top)
    lw = log_w.double()
    table = {}
    for name, u in energies.items():
        if u is None:
            continue
        rows = [(name, None)] + ([("generator (reweighted)", lw.numpy())] if name == "generator" else [])
        for label, w in rows:
            med, lo, hi = weighted_quantiles(u, (0.5, 0.05, 0.95), w)
            table[label] = {"median": med, "q05": lo, "q95": hi, "finite_fraction": float(np.isfinite(u).mean())}
    x = torch.as_tensor(traj.xyz, dtype=torch.float64)
    residues = [str(top.atom(int(i)).residue) for i in ca]
    contacts, dd = {}, {}
    if len(ca) >= 2:
        contacts["generator"] = contact_map(x, top, cutoff=cutoff).numpy()
        contacts["generator (reweighted)"] = contact_map(x, top, lw, cutoff=cutoff).numpy()
    if reference is not None:
        xr = torch.as_tensor(reference.xyz, dtype=torch.float64)
        if len(ca) >= 2:
            contacts["reference"] = contact_map(xr, reference.topology, cutoff=cutoff).numpy()
        try:
            pairs = backbone_pairs(top)
        except ValueError:  # no protein backbone
            pairs = None
        if pairs is not None:
            ref_mean = _mean_distances(xr, pairs)
            dd = {"raw": float((_mean_distances(x, pairs) - ref_mean).abs().mean()),
                  "reweighted": float((_mean_distances(x, pairs, lw) - ref_mean).abs().mean())}
    if not table and not contacts and not dd:
        return None
    return Structure(energies=table, distance_distortion=dd, contacts=contacts, contact_cutoff=cutoff,
                     residues=residues, energy_values={k: v for k, v in energies.items() if v is not None},
                     log_w=lw.numpy())


def load_samples(folder: str | Path) -> tuple[md.Trajectory, dict[str, np.ndarray], dict[str, Any]]:
    """A ``predict`` samples folder (``callbacks.SampleWriter``): the frames, the per-frame arrays and the
    sampler statistics (``{}`` for proposal samples)."""
    folder = Path(folder)
    traj_files = sorted(p for p in folder.glob("samples.*") if p.suffix not in (".npz", ".json"))
    if not traj_files or not (folder / "samples.npz").exists():
        raise FileNotFoundError(f"{folder}: not a samples folder (samples.<format> and samples.npz, from `bg predict`)")
    with quiet_c_output():  # the DCD reader's chatter
        traj = md.load(str(traj_files[0]), top=str(folder / "topology.pdb"))
    arrays = dict(np.load(folder / "samples.npz"))
    stats = json.loads((folder / "samples.json").read_text()) if (folder / "samples.json").exists() else {}
    return traj, arrays, stats


def evaluate(
    source: Any,
    n: int = 20000,
    reference: Sequence[str | Path | md.Trajectory] | md.Trajectory | None = None,
    topology: str | Path | md.Topology | None = None,
    *,
    states: tuple[list[str], StateLabels] | None = None,
    observables: dict[str, Observable] | None = None,
    native: md.Trajectory | None = None,
    energy: EnergyChoice = "model",
    bins: int = 36,
    max_residues: int = 4,
    n_boot: int = 1000,
    min_ess: float = 100.0,
    seed: int = 0,
    batch_size: int = 2000,
    label: str | None = None,
    weights: Literal["averaged", "training"] = "averaged",
    contact_cutoff: float = CONTACT_CUTOFF,
    reference_energies: bool = True,
) -> Report:
    """Evaluate a generator (a checkpoint path or a loaded module: ``n`` samples drawn and weighed) or a
    ``predict`` samples folder, optionally against ``reference`` MD (trajectory files — each one
    independent, time-ordered run — with ``topology``, or ``mdtraj.Trajectory`` objects). ``states``
    defaults to the φ/ψ basins of a single-residue peptide, ``observables`` to RMSD/Q/Rg when ``native``
    is given. ``energy`` judges generator samples: the model's own target, or ``torch``/``openmm`` anew.
    ``weights``: of a checkpoint trained with weight averaging (EMA), the averaged weights or the optimizer's own
    (:func:`bg.load_generator`). ``contact_cutoff``: Cα–Cα distance (nm) of a contact in the contact maps;
    ``reference_energies``: judge the reference frames too (a checkpoint's system is needed; seconds per
    thousand frames of a small protein). No Trainer is involved. Returns a :class:`Report`."""
    warnings: list[str] = []
    if weights != "averaged" and not (isinstance(source, (str, Path)) and Path(source).is_file()):
        raise ValueError(f"weights={weights!r} selects weights of a checkpoint file; {source!r} is not one")
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        traj, arrays, stats = load_samples(source)
        log_w = torch.as_tensor(arrays["log_w"], dtype=torch.float64)
        energy_name, temperature = "the writer's target energy", None
        label = label or str(source)
        model, judge, u_gen = None, None, arrays.get("energy_kT")
    else:
        from bg import load_generator

        model = load_generator(source, weights=weights) if isinstance(source, (str, Path)) else source
        out, energy_name, judge = _draw(model, n, energy, seed, batch_size)
        u_gen = out["energy_kT"].detach().cpu().double().numpy()
        traj = md.Trajectory(out["x"].detach().cpu().numpy().astype(np.float32), model.system.topology)
        log_w, stats = out["log_w"].detach().cpu().double(), {}
        temperature = model.system.temperature
        label = label or (str(source) if isinstance(source, (str, Path)) else type(model).__name__)
    top = traj.topology
    gen_set = SampleSet(log_w, n_boot=n_boot, min_ess=min_ess, seed=seed)
    if stats.get("sampler"):
        # resampled particles carry equal weights: their spread says nothing about the proposal
        sampling = {"sampler": stats["sampler"], "n_ancestors": stats.get("n_ancestors"),
                    "ess_before_resampling": ess_before_resampling(stats), "log_z": stats.get("log_z")}
        if collapsed(stats.get("n_ancestors"), traj.n_frames):
            warnings.append(f"only {stats['n_ancestors']} of {traj.n_frames} particles have distinct ancestors "
                            f"(< {COLLAPSE_FRACTION:.0%}): the particles' estimates rest on those few proposals")
        warnings.append("SMC particles are not independent draws: bootstrap error bars understate the error")
    else:
        sampling = {"ess": _ess_estimate(log_w, n_boot, seed, min_ess).as_dict()}
        if gen_set.ess() < min_ess:
            warnings.append(f"ESS {gen_set.ess():.0f} < {min_ess:g} samples: error bars of weighted estimates "
                            "are not trustworthy")
    sets = {"generator": (traj, gen_set)}
    energies = {"generator": u_gen}
    if reference is not None:
        ref_traj, lengths = _load_reference(reference, topology or top)
        sets["reference"] = (ref_traj, SampleSet(None, n=ref_traj.n_frames, lengths=lengths))
        if judge is not None and reference_energies:
            xr = torch.as_tensor(ref_traj.xyz, dtype=torch.float64)
            energies["reference"] = _energies(judge, xr, batch_size).numpy()
            projected = _projected(model, xr, batch_size)
            if projected is not None:
                energies[PROJECTED] = _energies(judge, projected, batch_size).numpy()
    states = states if states is not None else basin_states(top)
    observables = dict(observables or {})
    if native is not None:
        observables.setdefault("RMSD to native (nm)", rmsd_to(native))
        observables.setdefault("Q (native contacts)", native_contacts(native))
        observables.setdefault("Rg (nm)", radius_of_gyration)
    pops, dfs, obs_values = {}, {}, {}
    names = states[0] if states else []
    for key, (t, ss) in sets.items():
        if states:
            labels = torch.as_tensor(states[1](t), dtype=torch.long)
            pops[key] = populations(labels, len(names), ss)
            dfs[key] = free_energy_differences(labels, len(names), ss)
        obs_values[key] = {name: np.asarray(f(t), dtype=float) for name, f in observables.items()}
    obs = {name: {key: ss.estimate(torch.as_tensor(obs_values[key][name])[:, None])[0] for key, (_, ss) in sets.items()}
           for name in observables}
    surfaces = _surfaces(sets, obs_values, bins, max_residues)
    return Report(label=label, n_samples=traj.n_frames, energy=energy_name,
                  temperature=temperature or 300.0, sampling=sampling, states=names, populations=pops,
                  free_energies=dfs, observables=obs, surfaces=surfaces, warnings=warnings,
                  reference_frames=sets["reference"][0].n_frames if "reference" in sets else 0,
                  structure=_structure(traj, log_w, sets["reference"][0] if "reference" in sets else None, energies,
                                       contact_cutoff))


def _ess_estimate(log_w: Tensor, n_boot: int, seed: int, min_ess: float) -> Estimate:
    """Kish ESS/n (the training metric's value) with a bootstrap interval over samples."""
    value = float(kish_ess(log_w))
    gen = torch.Generator().manual_seed(seed)
    boot = torch.stack([kish_ess(log_w[torch.randint(len(log_w), (len(log_w),), generator=gen)])
                        for _ in range(n_boot)])
    reliable = value * len(log_w) >= min_ess
    return Estimate(value, float(boot.std()), float(torch.quantile(boot, 0.025)), float(torch.quantile(boot, 0.975)),
                    reliable, "" if reliable else "too few effective samples")


def ess_before_resampling(stats: dict[str, Any]) -> float:
    """ESS/n of the particle weights at the last annealing step, before its resampling decision."""
    history = stats.get("ess_history") or []
    return float(history[-1]) if history else math.nan


def _load_reference(reference, topology) -> tuple[md.Trajectory, list[int]]:
    items = [reference] if isinstance(reference, (md.Trajectory, str, Path)) else list(reference)
    trajs = []
    for item in items:
        if isinstance(item, md.Trajectory):
            trajs.append(item)
        else:
            if not Path(item).exists():
                raise FileNotFoundError(f"{item}: reference trajectory not found")
            top = str(topology) if isinstance(topology, (str, Path)) else topology
            with quiet_c_output():
                trajs.append(md.load(str(item), top=top))
    if not trajs:
        raise ValueError("reference: no trajectories given")
    return md.join(trajs, check_topology=False, discard_overlapping_frames=False), [t.n_frames for t in trajs]


__all__ = ["PROJECTED", "Report", "Structure", "Surface", "basin_states", "evaluate", "load_samples", "native_contacts",
           "radius_of_gyration", "rmsd_to"]
