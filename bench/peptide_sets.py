"""Make a peptide set's MD (resumable) and write what it cost and holds to a Markdown results file.

    python bench/peptide_sets.py --spec configs/peptide_sets/single_residues.yaml --out bench/results/peptide_sets.md

Runs ``bg.systems.peptide_set.make_peptide_set`` (one process per core) and appends a section: the machine,
the command, wall time of this call, and per peptide its split, atoms, frames, statistical inefficiency g of
the backbone torsions, effective frames and the CPU time its MD took (from the manifest, so a resumed set
reports every peptide's own cost).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bg.systems.peptide_set import make_peptide_set, manifest_path, manifest_rows, peptide_name, read_spec  # noqa: E402


def table(manifest: dict) -> str:
    rows = ["| split | peptide | atoms | frames | g (frames) | effective frames | MD CPU time (s) |",
            "|---|---|---|---|---|---|---|"]
    for split, seq, e in manifest_rows(manifest):
        if e is None:
            rows.append(f"| {split} | {peptide_name(seq)} | – | not made yet | – | – | – |")
            continue
        rows.append(f"| {split} | {e['name']} | {e['n_atoms']} | {e['frames']} | {e['statistical_inefficiency']:.1f} "
                    f"| {e['effective_frames']:.0f} | {e['seconds']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", required=True, help="peptide-set spec (configs/peptide_sets/*.yaml)")
    ap.add_argument("--cache-dir", default="data")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    ap.add_argument("--out", default="bench/results/peptide_sets.md")
    ap.add_argument("--report-only", action="store_true",
                    help="report the set as far as it is made (an interrupted run), without simulating")
    args = ap.parse_args()

    spec, md = read_spec(args.spec)
    start = time.time()
    if args.report_only:
        manifest = json.loads(manifest_path(args.cache_dir, spec.name).read_text())
    else:
        manifest = make_peptide_set(spec, args.cache_dir, md, workers=args.workers)
    wall = time.time() - start
    cpu = sum(e["seconds"] for e in manifest["peptides"].values())
    ns = md.n_frames * md.frame_interval_ps / 1000
    command = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    section = (
        f"## {spec.name} ({time.strftime('%Y-%m-%d')})\n\n"
        f"Machine: {platform.node()} ({os.cpu_count()} cores, no GPU). Command: `{command}`. "
        f"Spec: {args.spec}; {len(spec.expand())} peptides, {spec.forcefield}, {spec.temperature} K, "
        f"{ns:g} ns each ({md.n_frames} frames every {md.frame_interval_ps} ps). "
        + ("Report of an interrupted run (the same command without --report-only resumes it); "
           if args.report_only else f"This call: {wall / 60:.1f} min wall; ")
        + f"MD of the {len(manifest['peptides'])} peptides made: {cpu / 60:.1f} CPU-min (one OpenMM thread each). Manifest: "
        f"{manifest_path(args.cache_dir, spec.name)}.\n\n{table(manifest)}\n\n"
    )
    out = Path(args.out)
    head = "# Peptide sets: MD of many peptides for transferable generators (issue 19)\n\n"
    text = out.read_text() if out.exists() else head
    out.write_text(text + section)
    print(section)


if __name__ == "__main__":
    main()
