# Sourced by the set-up scripts: make (once) and activate the project's virtual environment with its pinned deps.
# torch is installed first and on its own: torch==2.13.0 is the CPU wheel on these machines, and installing it
# before anything that depends on torch stops pip from choosing a newer build with gigabytes of CUDA packages.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CROSSKD_VENV:-$root/.venv}"
extras="${1:-}"
if [ ! -x "$venv/bin/python" ]; then
  echo "crosskd: creating a virtual environment in $venv"
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
stamp="$venv/.crosskd-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  echo "crosskd: installing dependencies (torch==2.13.0 first)"
  python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
  python -m pip install --quiet --disable-pip-version-check -e "$root${extras:+[$extras]}"
  touch "$stamp"
fi
