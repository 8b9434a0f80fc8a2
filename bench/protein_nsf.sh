#!/usr/bin/env bash
# Issue 20's protein experiment, end to end: native-state MD (constrained, 4 fs; resumable, skipped when done),
# the protein recipe (configs/<config>.yaml, ≤ 60 min of training here) and `bg analyze` of its last checkpoint
# with 20,000 samples judged by OpenMM against the whole MD: ESS/n with a bootstrap interval, energies (also
# of the MD frames on the model's coordinates), ΔD, contact maps, RMSD/Q/Rg to the native structure.
#   bash bench/protein_nsf.sh villin      # → bench/results/villin_hp35/   (MD ~1 h, training ~1 h, judging ~20 min)
#   bash bench/protein_nsf.sh protein_g   # → bench/results/protein_g_nsf/ (MD ~2 h)
# Extra arguments go to `bg fit` (e.g. --model.init_args.split_channels=false for the baseline; then set OUT).
# Wall times are appended to bench/runs/<name>/times.txt; logs sit beside them.
# Resumable at every step: the MD continues from its last chunk; a training run that was interrupted (fit.log without
# its "last checkpoint:" line) continues from its newest last.ckpt (`--ckpt_path last`, written at every epoch's end
# and on SIGTERM); a finished one is not trained again (remove bench/runs/<name>/fit.log to retrain); judging reruns.
set -euo pipefail
PROTEIN=${1:?usage: bash bench/protein_nsf.sh villin|protein_g [bg fit options]}
shift
case $PROTEIN in
  villin) PDB=../shared/data/villin_1vii.pdb; CONFIG=configs/hp35_nsf.yaml; NAME=villin_1vii; DEFAULT_OUT=villin_hp35 ;;
  protein_g) PDB=../shared/data/protein_g_1pga.pdb; CONFIG=configs/protein_g_nsf.yaml; NAME=protein_g_1pga
             DEFAULT_OUT=protein_g_nsf ;;
  *) echo "unknown protein '$PROTEIN' (villin | protein_g)" >&2; exit 2 ;;
esac
OUT=${OUT:-$DEFAULT_OUT}
BG=${BG:-.venv/bin/bg}
MD=data/${NAME}_hbonds/md
RUN=bench/runs/$OUT
mkdir -p "$RUN"
export WANDB_MODE=${WANDB_MODE:-offline}
stamp() { echo "$1: $2 s ($(date -u +%FT%TZ))" >> "$RUN/times.txt"; }

start=$(date +%s)
$BG data --system "$PDB" --constraints hbonds --hydrogen-mass 4 --timestep-fs 4 --n-frames 5000 --steps-per-frame 25 \
    --equilibration-steps 5000 2>&1 | tail -20 > "$RUN/data.log"
stamp "MD (500 ps; 0 when already made)" $(( $(date +%s) - start ))

if [[ -f $RUN/fit.log ]] && grep -q "last checkpoint: " "$RUN/fit.log"; then
  echo "training: done before ($RUN/fit.log)" >> "$RUN/times.txt"
else
  RESUME=()
  if [[ -f $RUN/fit.log ]]; then  # interrupted: continue it, keeping its log
    RESUME=(--ckpt_path last)
    echo "--- resumed $(date -u +%FT%TZ)" >> "$RUN/fit.log"
  fi
  start=$(date +%s)
  $BG fit --config $CONFIG --trainer.enable_progress_bar=false "$@" "${RESUME[@]}" >> "$RUN/fit.log" 2>&1
  stamp "training${RESUME:+ (resumed)}" $(( $(date +%s) - start ))
fi
CKPT=$(grep -o "last checkpoint: .*" "$RUN/fit.log" | tail -1 | cut -d' ' -f3)
echo "checkpoint: $CKPT" >> "$RUN/times.txt"

start=$(date +%s)
$BG analyze "$CKPT" --samples 20000 --energy openmm --reference $MD/chunks/chunk_*.dcd --topology $MD/topology.pdb \
    --native "$PDB" --bins 24 --out "bench/results/$OUT" > "$RUN/analyze.log" 2>&1
stamp "judging (20,000 samples, OpenMM)" $(( $(date +%s) - start ))
cat "$RUN/times.txt"
