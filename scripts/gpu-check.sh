#!/usr/bin/env bash
# Airlock's GPU path on an NVIDIA machine: the local backend, a short LoRA fine-tune and an interp
# trace on CUDA (bfloat16 where the GPU supports it), with throughput figures.
#
# The machine needs a CUDA build of torch, transformers and peft (a typical GPU image has them) and
# may have no internet: Airlock and its pure-Python dependencies come from a wheelhouse brought along.
# Build the wheelhouse on any machine with internet and the GPU box's Python version:
#
#   pip wheel --wheel-dir wheelhouse --no-deps .                  # Airlock itself
#   pip download --dest wheelhouse --only-binary=:all: \
#       --python-version 3.12 --platform manylinux2014_x86_64 \
#       -r <(python scripts/gpu-check.sh --print-requirements)    # its dependencies, minus torch/transformers/peft
#
# then copy wheelhouse/ and this repository's scripts/ to the GPU box and run
#
#   scripts/gpu-check.sh --wheelhouse ./wheelhouse [--model embedded:smollm2-135m] [--device cuda]
#
# Options after the ones below are passed to scripts/gpu_check.py (--tokens, --streams, --steps, --calls).
# --device cpu --model tiny-random runs the same steps without a GPU (a dry run of the script).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WHEELHOUSE=""
VENV="${GPU_CHECK_VENV:-${TMPDIR:-/tmp}/airlock-gpu-check}"
PYTHON="${PYTHON:-python3}"
DEVICE="cuda"
MODEL="embedded:smollm2-135m"
PASS=()

# The pure-Python (and small binary) packages the three checks import besides torch, transformers and peft.
REQUIREMENTS=(
    # Airlock's own dependencies (pyproject.toml), then the local extra's minus torch, transformers, peft.
    "pydantic>=2.7" "pydantic-settings>=2.3" "typer>=0.12" "rich>=13" "markdown-it-py>=3" "pyyaml>=6"
    "httpx>=0.27" "cryptography>=42" "rfc8785>=0.1.4" "numpy>=1.26" "openai>=1.40" "tenacity>=8"
    "python-dateutil>=2.8" "jinja2>=3.1" "fastapi-offline>=1.7,<2" "sqlalchemy>=2.0.30"
    "safetensors>=0.4" "gguf>=0.10" "llguidance>=1.9,<2"
)

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheelhouse) WHEELHOUSE="$2"; shift 2 ;;
        --venv) VENV="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        --print-requirements) printf '%s\n' "${REQUIREMENTS[@]}"; exit 0 ;;
        -h|--help) usage; exit 0 ;;
        *) PASS+=("$1"); shift ;;
    esac
done

if [[ "$DEVICE" == cuda* ]]; then
    command -v nvidia-smi >/dev/null 2>&1 || { echo "gpu-check: nvidia-smi not found; is this an NVIDIA machine?" >&2; exit 2; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

# A venv over the system's site-packages: torch, transformers and peft are the machine's own (CUDA) builds.
if [[ -n "$WHEELHOUSE" ]]; then
    [[ -d "$WHEELHOUSE" ]] || { echo "gpu-check: no wheelhouse at $WHEELHOUSE" >&2; exit 2; }
    "$PYTHON" -m venv --system-site-packages "$VENV"
    "$VENV/bin/pip" install --quiet --no-index --find-links "$WHEELHOUSE" "${REQUIREMENTS[@]}"
    # Airlock without its declared dependencies: its torch pin must not replace the machine's CUDA torch.
    "$VENV/bin/pip" install --quiet --no-index --find-links "$WHEELHOUSE" --no-deps airlock
    PY="$VENV/bin/python"
else
    PY="$PYTHON"  # Airlock already importable (a checkout with PYTHONPATH=src, or installed)
fi

"$PY" - <<'PYCHECK'
import sys
try:
    import peft, torch, transformers  # noqa: F401
    import airlock  # noqa: F401
except ImportError as exc:
    sys.exit(f"gpu-check: {exc}; install torch, transformers and peft, and Airlock (--wheelhouse)")
PYCHECK

exec "$PY" "$HERE/gpu_check.py" --device "$DEVICE" --model "$MODEL" "${PASS[@]}"
