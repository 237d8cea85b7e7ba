#!/usr/bin/env bash
# The main job on the embedded default: set up the reference pair (Qwen2.5-Coder-0.5B-Instruct teacher,
# SmolLM2-135M-Instruct student) and distil it on the Python standard library's source, teacher online.
# Extra arguments are passed to `crosskd train` as dotted overrides, e.g. training.max_steps=5
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/_venv.sh"
cd "$root"
crosskd setup-models
crosskd train configs/reference.yaml "$@"
