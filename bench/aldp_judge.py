"""Judge alanine dipeptide generators against the replica-exchange reference (bench/aldp_reference.py).

For each checkpoint: ``--repeats`` independent draws of ``--samples`` flow samples, energies from OpenMM
(the reference implementation) and from the torch force field, ESS/n under each as the mean (and range) over
the draws — a Kish ESS of heavy-tailed weights varies by ±20 % between draws of 20,000 —; on the pooled
samples: the reweighted φ > 0 population with its standard error
(delta method over the self-normalised weights) against the reference's within the combined 2σ; the
reweighted φ/ψ torsion W2 to the reference against 1.5× its split-half floor; basin populations.

    python bench/aldp_judge.py --checkpoint best=runs/.../best.ckpt --samples 20000 \\
        --reference bench/runs/aldp_reference/reference.pt --out bench/results/aldp_judge.md
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bg  # noqa: E402
from bg.analysis import BASINS, basin_populations, phi_psi_atoms, torsions  # noqa: E402
from bg.energy import target_energy  # noqa: E402
from bg.metrics import circular_w2_1d  # noqa: E402
from bg.sampling.ess import kish_ess  # noqa: E402


def weighted_fraction(indicator: torch.Tensor, log_w: torch.Tensor) -> tuple[float, float]:
    """Self-normalised IS estimate of E[indicator] and its standard error (delta method)."""
    lw = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
    w = torch.softmax(lw, 0)
    p = float((w * indicator).sum())
    return p, float(torch.sqrt((w**2 * (indicator - p) ** 2).sum()))


@torch.no_grad()
def draw(model, openmm_u, n: int, seed: int, batch: int) -> dict:
    """``n`` samples from seed ``seed``: φ/ψ ``(n, 2)``, log w under OpenMM and the torch force field."""
    torch.manual_seed(seed)
    x, log_q = model.sample(n, batch_size=batch)
    u_torch = torch.cat([model.energy(c) for c in x.split(batch)])
    u_omm = torch.cat([openmm_u(c) for c in x.split(batch)])
    phi_q, psi_q = phi_psi_atoms(model.topology)
    # agreement where it matters (u < 100 kT); clashing samples reach 1e6 kT, where float64 rounding alone is
    # several kT
    du = (u_torch - u_omm)[torch.isfinite(u_omm) & (u_omm < 100)].abs().max()
    return {"angles": torch.cat([torsions(x, phi_q), torsions(x, psi_q)], 1), "log_w_openmm": -u_omm - log_q,
            "log_w_torch": -u_torch - log_q, "max_abs_du": float(du)}


def judge(label: str, ckpt: str, ref: dict, n: int, seed: int, batch: int, repeats: int = 1,
          weights: str = "averaged") -> dict:
    """ESS/n of each of ``repeats`` independent draws of ``n`` samples (a Kish ESS of heavy-tailed weights
    varies a lot between draws); populations and W2 from all draws pooled. ``weights``: see
    ``bg.load_generator`` (EMA-trained checkpoints hold both)."""
    model = bg.load_generator(ckpt, weights=weights)
    openmm_u = target_energy(model.system, backend="openmm", n_workers=0)
    draws = [draw(model, openmm_u, n, seed + k, batch) for k in range(repeats)]
    out = {"label": label, "checkpoint": ckpt, "n": n, "repeats": repeats,
           "max_abs_du": max(d["max_abs_du"] for d in draws)}
    for name in ("openmm", "torch"):
        values = [float(kish_ess(d[f"log_w_{name}"])) for d in draws]  # ESS/n
        out[f"ess_{name}"], out[f"ess_{name}_draws"] = sum(values) / len(values), values
        # one Kish ESS over every draw: heavy weights that a single draw may miss count here
        out[f"ess_{name}_pooled"] = float(kish_ess(torch.cat([d[f"log_w_{name}"] for d in draws])))
    angles = torch.cat([d["angles"] for d in draws])
    log_w = torch.cat([d["log_w_openmm"] for d in draws])
    pos = (angles[:, 0] > 0).double()
    out["phi_positive_raw"] = float(pos.mean())
    out["phi_positive"], out["phi_positive_sigma"] = weighted_fraction(pos, log_w)
    out["basins"] = basin_populations(angles[:, 0], angles[:, 1], log_w)
    if ref is None:  # no reference at hand: ESS and reweighted populations only
        out.update(torsion_w2=math.nan, torsion_w2_raw=math.nan, phi_positive_ok=None, torsion_w2_ok=None)
        return out
    w = torch.softmax(torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf)), 0)
    ref_angles = ref["angles"]
    out["torsion_w2"] = float(circular_w2_1d(angles, ref_angles, w).mean())
    out["torsion_w2_raw"] = float(circular_w2_1d(angles, ref_angles).mean())
    gap = abs(out["phi_positive"] - ref["phi_positive"])
    out["phi_positive_ok"] = gap <= 2 * math.hypot(out["phi_positive_sigma"], ref["phi_positive_sigma"])
    out["torsion_w2_ok"] = out["torsion_w2"] <= 1.5 * ref["split_half_torsion_w2"]
    return out


def yes_no(ok: bool | None) -> str:
    return "–" if ok is None else ("yes" if ok else "no")


def ess_cell(mean: float, draws: list[float], pooled: float) -> str:
    if len(draws) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ({min(draws):.3f}–{max(draws):.3f}; pooled {pooled:.3f})"


def label_and_path(item: str) -> tuple[str, str, str]:
    """``label=path`` (Lightning's file names hold '=' too: the split is at the first '=' that leaves an
    existing file) or a bare path (labelled by its file name), optionally ending in ``@training`` or
    ``@averaged`` (which weights of an EMA-trained checkpoint; default averaged) -> (label, path, weights)."""
    weights = "averaged"
    for choice in ("training", "averaged"):
        if item.endswith("@" + choice):
            item, weights = item[:-len(choice) - 1], choice
    if Path(item).exists():
        return Path(item).name, item, weights
    for i, c in enumerate(item):
        if c == "=" and Path(item[i + 1:]).exists():
            return item[:i], item[i + 1:], weights
    raise FileNotFoundError(f"{item}: no checkpoint there (give label=path or a path)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True,
                    help="label=path[@training|@averaged] (repeatable; @training: the optimizer's weights of a "
                    "checkpoint trained with EMAWeightAveraging, default: the averaged ones)")
    ap.add_argument("--reference", default="bench/runs/aldp_reference/reference.pt",
                    help="reference.pt of bench/aldp_reference.py, or 'none' (ESS and reweighted populations only)")
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="independent draws of --samples per checkpoint "
                    "(seeds seed, seed+1, ...): ESS/n as mean (min–max); populations and W2 pooled")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ref = None if args.reference == "none" else torch.load(ROOT / args.reference, weights_only=False)
    rows = []
    for item in args.checkpoint:
        label, path, weights = label_and_path(item)
        rows.append(judge(label, path, ref, args.samples, args.seed, args.batch, args.repeats, weights))
    cmd = "python bench/aldp_judge.py " + " ".join(f"--checkpoint {c}" for c in args.checkpoint) + \
        f" --samples {args.samples} --repeats {args.repeats} --reference {args.reference}"
    lines = [f"Machine: {platform.node()} (2 CPU cores, no GPU), torch {torch.__version__}. Command: `{cmd}`", ""]
    if args.note:
        lines += [args.note, ""]
    lines += [f"Reference: {args.reference}: φ > 0 = {ref['phi_positive']:.4f} ± {ref['phi_positive_sigma']:.4f}, "
              f"split-half φ/ψ torsion W2 {ref['split_half_torsion_w2']:.4f} rad ({ref['frames']} frames)."
              if ref is not None else "Reference: none (ESS/n and reweighted populations only).", "",
              "| generator | ESS/n (OpenMM) | ESS/n (torch FF) | φ>0 raw | φ>0 reweighted (±1σ) | within 2σ | "
              "φ/ψ W2 raw | φ/ψ W2 reweighted | ≤ 1.5× floor | basins reweighted (" + " / ".join(BASINS) + ") |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {ess_cell(r['ess_openmm'], r['ess_openmm_draws'], r['ess_openmm_pooled'])} | "
                     f"{ess_cell(r['ess_torch'], r['ess_torch_draws'], r['ess_torch_pooled'])} | {r['phi_positive_raw']:.4f} | "
                     f"{r['phi_positive']:.4f} ± {r['phi_positive_sigma']:.4f} | {yes_no(r['phi_positive_ok'])} | "
                     f"{r['torsion_w2_raw']:.4f} | {r['torsion_w2']:.4f} | {yes_no(r['torsion_w2_ok'])} | "
                     f"{' / '.join(f'{v:.4f}' for v in r['basins'].values())} |")
    lines += ["", f"ESS/n: mean (min–max) over {args.repeats} independent draws of {rows[0]['n']} samples each "
              f"(seeds {args.seed}…{args.seed + args.repeats - 1}), and one ESS/n of all {args.repeats * rows[0]['n']} "
              f"pooled; φ > 0, W2 and basins from the pooled samples. Largest |u_torch − u_OpenMM|: "
              f"{max(r['max_abs_du'] for r in rows):.2e} kT over samples below 100 kT."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
