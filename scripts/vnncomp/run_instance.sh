#!/usr/bin/env bash
# VNN-COMP harness entry point:
#   run_instance.sh v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT
# Writes the competition answer (sat + counterexample, unsat, unknown, timeout, error) to
# RESULTS_FILE via `dualgraph verify`. CATEGORY is accepted for the harness; the tool does
# not use it. DUALGRAPH_THREADS=N sets the number of torch CPU threads.
set -u

if [ "$#" -ne 6 ]; then
    echo "usage: $0 v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT" >&2
    exit 1
fi
VERSION=$1 CATEGORY=$2 ONNX=$3 VNNLIB=$4 RESULTS=$5 TIMEOUT=$6
if [ "$VERSION" != "v1" ]; then
    echo "$0: expected version string v1, got '$VERSION'" >&2
    exit 1
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# The repository's venv first (the sources on PYTHONPATH, installed or not), then an
# installed `dualgraph` command, then any python3 that can import the sources.
if [ -x "$REPO/.venv/bin/python" ]; then
    CMD=("$REPO/.venv/bin/python" -m dualgraph.cli)
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
elif command -v dualgraph >/dev/null 2>&1; then
    CMD=(dualgraph)
else
    CMD=(python3 -m dualgraph.cli)
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
EXTRA=()
if [ -n "${DUALGRAPH_THREADS:-}" ]; then
    EXTRA=(--threads "$DUALGRAPH_THREADS")
fi

echo "dualgraph: category $CATEGORY, timeout $TIMEOUT s: $ONNX $VNNLIB" >&2
rm -f "$RESULTS"
"${CMD[@]}" verify "$ONNX" "$VNNLIB" --timeout "$TIMEOUT" --results "$RESULTS" "${EXTRA[@]}"
STATUS=$?
# The harness reads the file: a crash before dualgraph could write it is an error.
if [ ! -s "$RESULTS" ]; then
    echo "error" > "$RESULTS"
fi
exit $STATUS
