#!/usr/bin/env bash
# The test suite: tiny models and tokenizers, plus the real reference pair end to end (set up on first use).
# Extra arguments go to pytest, e.g. -m "not reference" to skip the real-pair tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/_venv.sh" test
cd "$root"
crosskd setup-models
python -m pytest "$@"
