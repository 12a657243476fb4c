#!/usr/bin/env bash
# Creates benches/.venv-st with sentence-transformers (PyTorch CPU) for `semtel bench embed --st`.
# Not used by CI. Prints the interpreter to pass to --st.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv-st/bin/python ]; then
  python3 -m venv .venv-st
  .venv-st/bin/pip install -q "sentence-transformers>=3" numpy
fi
echo "$(pwd)/.venv-st/bin/python"
