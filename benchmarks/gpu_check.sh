#!/usr/bin/env bash
# The prepared GPU check (issues 19, 36): installs what the check needs and the machine lacks,
# then runs benchmarks/gpu_check.py, which prints one table and writes it as JSON
# ($OUT/gpu_check.json when OUT is set, else benchmarks/gpu_check.json).
#
#   bash benchmarks/gpu_check.sh                  # on a machine with one CUDA GPU, from the repo
#   bash benchmarks/gpu_check.sh --smoke          # every part on the CPU with tiny sizes
#   bash benchmarks/gpu_check.sh --prepare-carry  # where the index is reachable: fill .gpu-carry/
#                                                 # for a lent machine and print the calls to make
#
# Packages never fail the check (benchmarks/gpu_carry.py install): the wheels carried in
# .gpu-carry/*/ are installed into $FUNGI_CARRY_SITE (default /tmp/fungi-carry-site, on
# PYTHONPATH, kept between two calls on a warm machine), then the package index is tried once
# with a short timeout for what is still missing (the machine's torch and numpy kept); a part
# whose packages stay missing is listed under `failed` with the reason, the others run. The
# repo runs from its checkout (PYTHONPATH), not installed. Other arguments go to gpu_check.py
# (--parts, --budget-s, --pipeline-batch-size, --output).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ "${1:-}" = "--prepare-carry" ]; then
    shift
    exec "$PYTHON" benchmarks/gpu_carry.py prepare "$@"
fi
export FUNGI_CARRY_SITE=${FUNGI_CARRY_SITE:-/tmp/fungi-carry-site}
export PYTHONPATH="$PWD:$FUNGI_CARRY_SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
started=$(date +%s)
"$PYTHON" benchmarks/gpu_carry.py install --site "$FUNGI_CARRY_SITE" || echo "gpu_check.sh: installing failed; the parts that need a missing package will say so" >&2
echo "gpu_check.sh: packages ready in $(( $(date +%s) - started )) s" >&2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
exec "$PYTHON" benchmarks/gpu_check.py "$@"
