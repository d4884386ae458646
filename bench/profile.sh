#!/usr/bin/env sh
# Profile the worker's process through one `goflow-gpu bench` job with py-spy, then summarise
# where its CPU time went (bench/profile_summary.py; the table in docs/PERFORMANCE.md).
#
#   bench/profile.sh OUTDIR [goflow-gpu bench options...]
#   bench/profile.sh /tmp/prof --media 20 --analyses 25 --qa-retries 0 --max-tokens 64
#
# py-spy comes with the dev dependencies (scripts/setup.sh). Only the worker's own process is
# sampled (the engine core is a separate process and shows in the bench's busy fraction).
set -eu
if [ $# -lt 1 ]; then
    echo "usage: bench/profile.sh OUTDIR [goflow-gpu bench options...]" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
python=${PYTHON:-$root/.venv/bin/python}
out=$1
shift
mkdir -p "$out"
"$(dirname "$python")/py-spy" record --rate 200 --format raw -o "$out/profile.txt" -- \
    "$python" -m goflow_gpu bench --out "$out/bench" "$@"
"$python" "$here/profile_summary.py" "$out/profile.txt" --rate 200 | tee "$out/profile.md"
