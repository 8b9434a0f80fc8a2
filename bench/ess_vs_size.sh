#!/usr/bin/env bash
# How the importance-sampling ESS of one CPU recipe falls with the size of the molecule (issue 20: why villin's
# ESS/n sits at 1/n). Capped polyalanines Ace-(Ala)_n-Nme built from the sequence, each with 2 ns of its own MD
# made as villin's is (amber14 + OBC2, 300 K, bonds to H constrained, hydrogen mass 4 amu, 4 fs; 10,000 frames), put
# on villin's representation (reduced internal coordinates, bonds to H frozen) and trained with `make train`'s
# recipe otherwise unchanged (configs/aldp_nsf.yaml: split-channel NSF, ML 20 epochs → log-variance 60 epochs), then
# judged by `bg analyze` with 20,000 samples under OpenMM. σ² = ln(n/ESS) is the log-weight variance a log-normal
# spread of that ESS has; bench/ess_vs_size.py extrapolates its growth with the coordinates to villin's and protein G's.
#   bash bench/ess_vs_size.sh                 # A, AAA, AAAAAA → bench/results/ess_vs_size/<SEQ>/
#   bash bench/ess_vs_size.sh AAAAAAAAA       # other sequences
# Resumable per sequence: a finished MD is reused (cache); an interrupted training (fit.log without its "last
# checkpoint:" line) continues from its newest last.ckpt (`--ckpt_path last`); a finished one is not repeated;
# judging reruns. Wall times go to bench/runs/ess_vs_size/<SEQ>/times.txt.
set -euo pipefail
BG=${BG:-.venv/bin/bg}
export WANDB_MODE=${WANDB_MODE:-offline}
SEQS=("$@")
fail() { echo "bench/ess_vs_size.sh: $SEQ failed; the end of $1:" >&2; tail -5 "$1" >&2; exit 1; }
[[ ${#SEQS[@]} -gt 0 ]] || SEQS=(A AAA AAAAAA)
for SEQ in "${SEQS[@]}"; do
  RUN=bench/runs/ess_vs_size/$SEQ
  CACHE=data/ess_vs_size
  mkdir -p "$RUN"
  stamp() { echo "$1: $2 s ($(date -u +%FT%TZ))" >> "$RUN/times.txt"; }
  MD_ARGS=(--constraints hbonds --hydrogen-mass 4 --timestep-fs 4 --n-frames 10000 --steps-per-frame 50
            --equilibration-steps 5000)
  start=$(date +%s)
  $BG data --system "peptide:$SEQ" --forcefield amber14-obc2 "${MD_ARGS[@]}" --cache-dir $CACHE > "$RUN/data.log" 2>&1 \
      || fail "$RUN/data.log"
  stamp "MD (2 ns; ~0 when cached)" $(( $(date +%s) - start ))
  if ! { [[ -f $RUN/fit.log ]] && grep -q "last checkpoint: " "$RUN/fit.log"; }; then
    RESUME=()
    if [[ -f $RUN/fit.log ]]; then  # interrupted: continue from its newest last.ckpt, keeping its log
      RESUME=(--ckpt_path last)
      echo "--- resumed $(date -u +%FT%TZ)" >> "$RUN/fit.log"
    fi
    start=$(date +%s)
    $BG fit --config configs/aldp_nsf.yaml --trainer.enable_progress_bar=false \
        --data.init_args.system="peptide:$SEQ" --data.init_args.forcefield=amber14-obc2 --data.init_args.generator=md \
        --data.init_args.cache_dir=$CACHE --data.init_args.constraints=hbonds --data.init_args.md.n_frames=10000 \
        --data.init_args.md.steps_per_frame=50 --data.init_args.md.timestep_fs=4.0 --data.init_args.md.hydrogen_mass=4.0 \
        --data.init_args.md.equilibration_steps=5000 --model.init_args.reduced=true "${RESUME[@]}" >> "$RUN/fit.log" 2>&1 \
      || fail "$RUN/fit.log"
    stamp "training${RESUME:+ (resumed)}" $(( $(date +%s) - start ))
  fi
  CKPT=$(grep -o "last checkpoint: .*" "$RUN/fit.log" | tail -1 | cut -d' ' -f3)
  MD=$(grep -o "data ready in .*" "$RUN/data.log" | cut -d' ' -f6)  # where `bg data` put this peptide's MD
  start=$(date +%s)
  $BG analyze "$CKPT" --samples 20000 --energy openmm --reference "$MD"/chunks/chunk_*.dcd --topology "$MD/topology.pdb" \
      --bins 24 --out "bench/results/ess_vs_size/$SEQ" > "$RUN/analyze.log" 2>&1 || fail "$RUN/analyze.log"
  stamp "judging (20,000 samples, OpenMM)" $(( $(date +%s) - start ))
done
