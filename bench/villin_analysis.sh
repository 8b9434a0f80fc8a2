#!/usr/bin/env bash
# The analysis report on a protein (issue 16): `bg analyze` of a villin checkpoint against the MD it was
# trained on, with RMSD, fraction of native contacts Q and radius of gyration to the native structure as
# observables. Short local MD (2 ps) and a short training (30 epochs of the hp35 recipe): the point is
# the report on a protein, not the sampler (issue 20 is the protein sampler).
#   bash bench/villin_analysis.sh [path/to/villin_1vii.pdb]      → bench/results/villin_analysis/
set -euo pipefail
PDB=${1:-../shared/data/villin_1vii.pdb}
RUN=bench/runs/villin_analysis
BG=${BG:-.venv/bin/bg}
mkdir -p "$RUN"
$BG data --system "$PDB" --n-frames 40 --steps-per-frame 50 --timestep-fs 1 --equilibration-steps 200 \
    --chunk-frames 20 --cache-dir "$RUN/data"
MD="$RUN/data/villin_1vii/md"
start=$(date +%s)
$BG fit --config configs/hp35_nsf.yaml --data.init_args.topology="$MD/topology.pdb" \
    --data.init_args.trajectories="[$MD/chunks/chunk_*.dcd]" --data.init_args.constraints=none --trainer.max_epochs=30 \
    --trainer.logger.init_args.save_dir="$RUN/runs" | tee "$RUN/fit.log"
echo "training wall time: $(( $(date +%s) - start )) s" | tee -a "$RUN/fit.log"
CKPT=$(grep -o "last checkpoint: .*" "$RUN/fit.log" | tail -1 | cut -d' ' -f3)
$BG analyze "$CKPT" --samples 2000 --energy torch --reference "$MD"/chunks/chunk_*.dcd --topology "$MD/topology.pdb" \
    --native "$PDB" --bins 24 --out bench/results/villin_analysis
