#!/usr/bin/env bash
# The numpy reference's own self-test (tests/golden/test_tower_ref.py: hashing, the F16/BF16
# decoders, spec/safetensors validation, expected.json reproduced by both forward paths).
# Python: TT_PYTHON if set; else python3 when it has numpy; else the project's numpy venv
# (bench/out/venv, the one bench/run.sh uses), created with pip when missing. Fails when the
# self-test fails, and when no python with numpy can be found or set up (the check is not skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=bench/out/venv
py=${TT_PYTHON:-}
if [ -z "$py" ]; then
  if python3 -c 'import numpy' >/dev/null 2>&1; then
    py=python3
  else
    if ! "$VENV/bin/python" -c 'import numpy' >/dev/null 2>&1; then
      mkdir -p bench/out
      { [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"; } \
        && "$VENV/bin/python" -m pip install -q --disable-pip-version-check numpy \
        || { echo "tests/golden.sh: could not set up $VENV with numpy (set TT_PYTHON to a python with numpy)" >&2; exit 1; }
    fi
    py=$VENV/bin/python
  fi
fi
echo "golden self-test with $py ($("$py" -c 'import numpy; print("numpy", numpy.__version__)'))"
"$py" tests/golden/test_tower_ref.py
