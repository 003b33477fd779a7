#!/usr/bin/env bash
# Generates Parley's Python proto package from proto/*.proto into OUT (default libs/proto/src).
# The -I parley/proto=proto mapping makes every generated import absolute: `from parley.proto import ...`.
set -euo pipefail
out="${1:-libs/proto/src}"
mkdir -p "$out/parley/proto"
python -m grpc_tools.protoc \
    -I parley/proto=proto \
    --python_out="$out" \
    --pyi_out="$out" \
    --grpc_python_out="$out" \
    --mypy_grpc_out="$out" \
    proto/*.proto
cat > "$out/parley/proto/__init__.py" <<'PY'
"""Generated from proto/ by `make proto`; do not edit (contract.py is written by hand)."""
PY
: > "$out/parley/proto/py.typed"
