#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): bash benchmarks/gpu_check.sh [--cpu-smoke] [--out DIR] [--only STAGES]
# On one GPU it runs in at most ~9 minutes; --cpu-smoke runs every stage at toy sizes on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
