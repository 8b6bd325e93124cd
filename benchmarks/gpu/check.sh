#!/usr/bin/env bash
# The GPU check: AMP training steps, the uint8 input path, a Ray Train run and the
# scoring job on a CUDA machine, printed as one table (benchmarks/gpu/check.py says what each row is).
#   benchmarks/gpu/check.sh          on a CUDA machine (under 8 minutes)
#   benchmarks/gpu/check.sh --cpu    the same steps at toy sizes on the CPU (checks the script itself)
# Uses .venv when it exists (make test creates it), else the python3 on PATH with avgk importable.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PY" benchmarks/gpu/check.py "$@"
