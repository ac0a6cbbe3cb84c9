#!/usr/bin/env bash
# Creates .venv if missing and installs the project into it. Without a GPU the pinned
# CPU torch wheel goes in first, so that nothing later pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
  if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    echo "[setup] no GPU found: installing the CPU torch wheel (torch==2.13.0)"
    .venv/bin/pip install -q torch==2.13.0
  fi
fi
echo "[setup] pip install -e .[dev]"
.venv/bin/pip install -q -e ".[dev]"
touch .venv/.installed
