#!/usr/bin/env bash
# The README's two commands.
#   infra/dev.sh main   set everything up, bring the local stack up (S3, MLflow, Prefect + worker, vLLM server), then
#                       run the main job: one periodic-learning round end to end (flows/main_job.py)
#   infra/dev.sh test   set everything up, then run the whole test suite
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash infra/setup.sh
py="${CL_CORE_VENV:-$root/.venv}/bin/python"
case "${1:-}" in
  main)
    "$py" -m cl_core.stack up
    # shellcheck disable=SC1091
    source "${CL_STACK_DIR:-$root/.state/stack}/env.sh"
    exec "$py" -m flows.main_job ;;
  demo) exec "$py" -m cl_core demo ;;
  test) shift; "$py" -m ruff check cl_core flows tasks tests; exec "$py" -m pytest tests "$@" ;;
  *) echo "usage: infra/dev.sh main|test [pytest args]|demo" >&2; exit 2 ;;
esac
