#!/usr/bin/env bash
# VNN-COMP harness entry point, run before each instance (not timed):
#   prepare_instance.sh v1 CATEGORY ONNX VNNLIB
# dualgraph needs no per-instance preparation (run_instance.sh loads and lowers the model
# itself); this checks the arguments, that the files exist, and that the tool imports.
set -u

if [ "$#" -ne 4 ]; then
    echo "usage: $0 v1 CATEGORY ONNX VNNLIB" >&2
    exit 1
fi
VERSION=$1 CATEGORY=$2 ONNX=$3 VNNLIB=$4
if [ "$VERSION" != "v1" ]; then
    echo "$0: expected version string v1, got '$VERSION'" >&2
    exit 1
fi
for f in "$ONNX" "$VNNLIB"; do
    if [ ! -f "$f" ]; then
        echo "$0: no such file: $f" >&2
        exit 1
    fi
done

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
if [ -x "$REPO/.venv/bin/python" ]; then
    PY="$REPO/.venv/bin/python"
elif command -v dualgraph >/dev/null 2>&1; then
    exit 0
else
    PY=python3
fi
if ! PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import dualgraph.verification" 2>/dev/null; then
    echo "$0: cannot import dualgraph with $PY; install the tool first" >&2
    exit 1
fi
echo "dualgraph: ready for category $CATEGORY" >&2
exit 0
