#!/usr/bin/env sh
# The prepared GPU benchmark (see goflow_gpu/bench/gpu.py and docs/PERFORMANCE.md).
#
#   bench/gpu_bench.sh OUTDIR [--engine vllm|transformers] [--arch 7b|3b] [--media 20]
#                     [--analyses 25] [--max-tokens 64]
#
# Needs one NVIDIA GPU, torch, transformers, aiohttp, pillow, pyyaml, rich, typer. pydantic,
# pydantic-settings and jsonschema may be missing there: put their wheels (and their own
# dependencies) in bench/wheels/ and they are installed from it, offline, into bench/.deps.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
python=${PYTHON:-python3}
if [ -d "$here/wheels" ]; then
    "$python" -m pip install --quiet --no-index --find-links "$here/wheels" \
        --target "$here/.deps" pydantic pydantic-settings jsonschema
    PYTHONPATH="$here/.deps${PYTHONPATH:+:$PYTHONPATH}"
fi
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$python" -m goflow_gpu.bench.gpu "$@"
