#!/bin/sh
# Rebuilds models/pixel_mlp.json and models/pixel_context.json from scratch: simulates the
# training cases, then trains both stages.
# Tuning data only: never the test sets (tests/data/pusim/test, test-perturbed, nerve-test, or
# own phantoms from seed 50000 on). One core for the simulation: a few hours for 240 cases.
# Run from the repository root:  sh tools/train_pixels.sh WORKDIR
set -e
W=${1:?usage: sh tools/train_pixels.sh WORKDIR}
PY=${PYTHON:-python3}
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMEXPR_NUM_THREADS=1
mkdir -p "$W"
# 1. Pulse-echo training cases (seed 59; the shipped model used cases 001-173 of this run,
#    the ones finished when it was trained: delete the rest, or keep them for a larger set).
$PY tools/pusim/simulate.py --out "$W/pusim-train" --set tune --count 240 --seed 59 \
    --convex 90 --scenes joint,bone,soft_tissue,nerve --prefix pusim_train --done-file
# 2. Own phantoms from the tuning seeds.
cargo run --release -- phantom --geometry mixed --seed 1 --count 100 --out "$W/phantom-tune"
cargo run --release -- phantom --geometry mixed --seed 101 --count 150 --out "$W/phantom-tune"
# 3. Training (deterministic for a given set of cases and seed).
cargo run --release -- train-pixels "$W/pusim-train" tests/data/pusim/tune \
    tests/data/pusim/nerve-tune "$W/phantom-tune" --epochs 16 --seed 2026 \
    --out models/pixel_mlp.json
# 4. The second stage (auto-context) over the first stage just trained, same cases.
cargo run --release -- train-pixels "$W/pusim-train" tests/data/pusim/tune \
    tests/data/pusim/nerve-tune "$W/phantom-tune" --first-stage models/pixel_mlp.json \
    --epochs 6 --seed 2026 --out models/pixel_context.json
