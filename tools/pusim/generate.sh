#!/bin/sh
# Regenerates tests/data/pusim/ (one process, one core; about 40-60 s per case).
# Run from the repository root:  sh tools/pusim/generate.sh > tests/data/pusim/generate.log 2>&1
set -e
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMEXPR_NUM_THREADS=1
PY=${PYTHON:-python3}
SIM=tools/pusim/simulate.py
OUT=tests/data/pusim
# 1. tuning set: 16 cases (about 9 linear over the two linear probes, 7 convex), no nerve scenes
$PY $SIM --out $OUT/tune --set tune --count 16 --seed 11 --convex 7 --done-file
# 2. test set: 32 cases (about 20 linear, 12 convex) + gain/DR variants in test-perturbed/
$PY $SIM --out $OUT/test --set test --count 32 --seed 23 --convex 12 \
    --perturbed-out $OUT/test-perturbed --done-file
# 3. nerve scenes (label 6): 8 for testing, 6 for tuning
$PY $SIM --out $OUT/nerve-test --set test --count 8 --seed 37 --scenes nerve \
    --prefix pusim_nerve_test --perturbed-out '' --done-file
$PY $SIM --out $OUT/nerve-tune --set tune --count 6 --seed 41 --scenes nerve \
    --prefix pusim_nerve_tune --done-file
