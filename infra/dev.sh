#!/usr/bin/env bash
# The README's two commands.
#   infra/dev.sh main   set everything up, then run the main job (today: the demo on the embedded default model)
#   infra/dev.sh test   set everything up, then run the whole test suite
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash infra/setup.sh
py="${CL_CORE_VENV:-$root/.venv}/bin/python"
case "${1:-}" in
  main) exec "$py" -m cl_core demo ;;
  test) shift; "$py" -m ruff check cl_core tests; exec "$py" -m pytest tests "$@" ;;
  *) echo "usage: infra/dev.sh main|test [pytest args]" >&2; exit 2 ;;
esac
