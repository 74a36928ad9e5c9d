#!/usr/bin/env bash
# Instructions per request on the gateway's hot path, counted by valgrind: exact and
# repeatable whatever else the machine is doing. Difference of two runs (N and 2N
# requests) so that start-up is not counted.  Usage: bench/instructions.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20000}
count() {
  valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/hotpath.py \
    --once --iterations "$1" 2>&1 | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
a=$(count "$n"); b=$(count $((2 * n)))
echo "$(( (b - a) / n )) instructions per request"
