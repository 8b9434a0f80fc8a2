"""Judge a transferable generator peptide by peptide against each peptide's own MD.

For each peptide of the chosen splits of a peptide set (default: ``test``, never trained on): bind the
generator to it, draw ``--samples`` with importance weights against that peptide's force field (OpenMM by
default: the reference implementation), and compare with the peptide's MD (``bg.evaluation``): ESS/n, the
fraction of samples kept by the checks (chirality, bond graph), φ/ψ torsion W2 raw and reweighted, and
basin populations raw / reweighted / MD. ``--logq-check K`` also solves K samples' log q again with an
adaptive dopri5 at 1e-6 and reports the largest difference to the model's own solver (e.g. rk4).

    python bench/transfer_judge.py --checkpoint runs/bg/<id>/checkpoints/last.ckpt \\
        --peptide-set configs/peptide_sets/single_residues.yaml --samples 500 --out bench/results/transfer_cnf.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bg  # noqa: E402
from bg.analysis import BASINS, basin_populations  # noqa: E402
from bg.energy import target_energy  # noqa: E402
from bg.evaluation import Reference, compute, sample_metrics  # noqa: E402
from bg.flows.cnf import ODESolver  # noqa: E402
from datamodules import PeptideSetDataModule  # noqa: E402


@torch.no_grad()
def logq_error(model, k: int, seed: int) -> float:
    """Largest |log q(model's solver) − log q(dopri5, rtol = atol = 1e-6)| over ``k`` of the model's samples (nats)."""
    torch.manual_seed(seed)
    x, log_q = model.sample(k)  # the density's own samples: no checks, no mirror folding on either side
    exact = model.density.log_prob(x, solver=ODESolver("dopri5", 1e-6, 1e-6))
    return float((log_q - exact).abs().max())


def judge_peptide(model, dm: PeptideSetDataModule, seq: str, frames: torch.Tensor, n: int, energy: str,
                  seed: int, max_reference: int, logq_check: int, repeats: int = 1) -> dict:
    system = dm.system(seq)
    model.bind(system)
    u = model.energy if energy == "torch" else target_energy(system, backend="openmm", n_workers=0)
    t = time.time()
    ref = Reference.from_frames(frames.double(), system.topology, u, max_reference)
    draws = []
    for r in range(repeats):  # independent draws: the spread of the ESS estimate
        torch.manual_seed(seed + 1000 * r)
        draws.append(compute(sample_metrics(ref, model.proposal.weigh(n, u))))
    seconds = (time.time() - t) / repeats
    values = draws[0]
    ess = [d["ess"] for d in draws]
    values.update(ess=sum(ess) / repeats, ess_min=min(ess), ess_max=max(ess), repeats=repeats)
    values["basins_md"] = basin_populations(ref.phi[:, 0], ref.psi[:, 0]) if ref.phi.shape[1] == 1 else {}
    values["logq_error"] = logq_error(model, logq_check, seed + 1) if logq_check else float("nan")
    split = dm.split_of(dm.molecule_index(seq))
    trained = model.peptides.get("train", [])
    if split == "train" and trained and seq not in trained:
        split = "unseen"  # in the data set's train split, never in the model's (a reference-only set)
    values.update(sequence=seq, split=split, n_atoms=system.n_atoms,
                  seconds=seconds, reference_frames=len(ref.x))
    return values


def row(v: dict) -> str:
    basins = " / ".join(
        f"{v.get(f'basin_{b}', float('nan')):.2f}·{v.get(f'basin_{b}_reweighted', float('nan')):.2f}·"
        f"{v['basins_md'].get(b, float('nan')):.2f}" for b in BASINS[:3])
    ess = f"{v['ess']:.4f}" + (f" ({v['ess_min']:.4f}–{v['ess_max']:.4f})" if v["repeats"] > 1 else "")
    return (f"| Ace-{v['sequence']}-Nme | {v['split']} | {v['n_atoms']} | {ess} | {v.get('valid_rate', 1.0):.2f} | "
            f"{v['torsion_w2']:.3f} | {v['torsion_w2_reweighted']:.3f} | {v['energy_w2']:.1f} | {basins} | "
            f"{v['logq_error']:.1e} | {v['seconds']:.0f} |")


#: the options that say what a generator is, per family (those it has)
DESCRIBED = ("hidden", "layers", "encoding", "solver", "backbone_layers", "sidechain_layers", "width", "depth", "bins",
             "interval_width", "harmonic")


def describe(model) -> str:
    hp = model.hparams
    options = ", ".join(f"{k} {hp[k]}" for k in DESCRIBED if k in hp)
    if hp.get("solver") in ("euler", "midpoint", "rk4"):
        options += f" ({hp.steps} steps)"
    if getattr(model, "defensive", 0.0):
        options += (f"; proposal: the untrained start alone" if model.defensive == 1.0 else
                    f"; proposal: {1 - model.defensive:g} flow + {model.defensive:g} its untrained start")
    return f"{type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters; {options})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--peptide-set", default="configs/peptide_sets/single_residues.yaml")
    ap.add_argument("--cache-dir", default="data")
    ap.add_argument("--splits", default="test", help="comma-separated splits to judge (train,val,test)")
    ap.add_argument("--sequences", default=None, help="comma-separated sequences (instead of --splits)")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--energy", choices=("openmm", "torch"), default="openmm")
    ap.add_argument("--stride", type=int, default=1, help="every n-th MD frame as the reference")
    ap.add_argument("--max-reference", type=int, default=2000)
    ap.add_argument("--logq-check", type=int, default=0, help="samples per peptide whose log q is re-solved by dopri5")
    ap.add_argument("--repeats", type=int, default=1, help="independent draws per peptide (ESS: mean, min–max)")
    ap.add_argument("--defensive", type=float, default=None,
                    help="share of samples from the flow's untrained start (TransferableNSF: 0 the flow alone, 1 the "
                         "start alone); default: the checkpoint's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = bg.load_generator(args.checkpoint)
    if args.defensive is not None:
        if not hasattr(model, "defensive"):
            raise SystemExit(f"--defensive: {type(model).__name__} has no untrained start to mix in")
        try:
            model.defensive = args.defensive
        except ValueError as error:
            raise SystemExit(f"--defensive: {error}") from None
    dm = PeptideSetDataModule(args.peptide_set, cache_dir=args.cache_dir, stride=args.stride)
    dm.setup("fit")
    if args.sequences:
        chosen = [s.strip().upper() for s in args.sequences.split(",")]
    else:
        chosen = [s for key in args.splits.split(",") for s in dm.split[key.strip()]]
    rows = []
    for seq in chosen:
        key = dm.split_of(dm.molecule_index(seq))
        frames = dm.positions[key][dm.split[key].index(seq)]
        rows.append(judge_peptide(model, dm, seq, frames, args.samples, args.energy, args.seed, args.max_reference,
                                  args.logq_check, args.repeats))
        print(row(rows[-1]), flush=True)
    hp = model.hparams
    cmd = (f"python bench/transfer_judge.py --checkpoint {args.checkpoint} --peptide-set {args.peptide_set} "
           f"--splits {args.splits} --samples {args.samples} --repeats {args.repeats} --energy {args.energy} "
           f"--logq-check {args.logq_check} --seed {args.seed}"
           + (f" --defensive {args.defensive:g}" if args.defensive is not None else "")
           + (f" --sequences {args.sequences}" if args.sequences else ""))
    trained = model.peptides.get("train", [])
    lines = [f"Machine: {platform.node()} (2 CPU cores, no GPU), torch {torch.__version__}. Command: `{cmd}`", "",
             f"Generator: {describe(model)}, trained on {len(trained)} peptides ({''.join(trained)}). "
             f"Energies: {args.energy}; {args.samples} samples per peptide" +
             (f", {args.repeats} independent draws (ESS/n: mean (min–max); the other columns: the first draw)"
              if args.repeats > 1 else "") + f"; reference: the peptide's MD (every {args.stride}. frame).", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["| peptide | split | atoms | ESS/n | kept | φ/ψ W2 raw | φ/ψ W2 reweighted | energy W2 (kT) | basins "
              + " / ".join(BASINS[:3]) + " (raw·reweighted·MD) | log q error (nats) | s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(v) for v in rows]
    held = [v for v in rows if v["split"] != "train"]
    if held:
        mean_ess = sum(v["ess"] for v in held) / len(held)
        better = sum(v["torsion_w2_reweighted"] < v["torsion_w2"] for v in held)
        lines += ["", f"Held-out peptides: mean ESS/n {mean_ess:.4f}; reweighted torsion W2 below raw on {better} of "
                  f"{len(held)}."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
