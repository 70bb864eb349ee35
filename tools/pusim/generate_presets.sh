#!/bin/sh
# Regenerates tests/data/pusim/presets/: five test scenes per injection-site preset
# (presets/sites.toml), simulated at the site the preset serves. Never used for tuning.
# Run from the repository root:
#   sh tools/pusim/generate_presets.sh > tests/data/pusim/presets/generate.log 2>&1
set -e
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMEXPR_NUM_THREADS=1
PY=${PYTHON:-python3}
SIM=tools/pusim/simulate.py
OUT=tests/data/pusim/presets
# preset            site(s)                 seed  extra options
while read -r preset sites seed extra; do
    $PY $SIM --out "$OUT/$preset" --set test --count 5 --seed "$seed" --sites "$sites" \
        --prefix "pusim_$(echo "$preset" | tr - _)" --perturbed-out '' --done-file $extra
done <<LIST
knee-suprapatellar knee_suprapatellar 101 --effusion always
shoulder-sasd-bursa shoulder_supraspinatus 102 --effusion always
shoulder-glenohumeral-posterior shoulder_posterior 103
elbow-common-extensor elbow_lateral 104
achilles-paratenon achilles 105
retrocalcaneal-bursa achilles 106 --effusion always
wrist-radiocarpal wrist_dorsal 107
carpal-tunnel median_wrist 108
ankle-tibiotalar ankle_anterior 109
LIST
