#!/usr/bin/env bash
# The local stack on loopback: SeaweedFS (S3), MLflow server, Prefect server + worker, vLLM OpenAI server.
#   infra/stack.sh up [--only s3,mlflow,...]     start what is not running, wait until healthy, print the URLs,
#                                                write .state/stack/env.sh (source it to point clients at the stack),
#                                                register the pipeline's Prefect deployments (python -m flows.deploy;
#                                                --no-deploy or CL_STACK_DEPLOY=0 skips it)
#   infra/stack.sh down [--only ...]             stop what up started (idempotent)
#   infra/stack.sh status [--only ...]           each service and its health (exit 1 when one is not healthy)
# Ports and paths: flags (--s3-port, --mlflow-port, --prefect-port, --worker-port, --vllm-port, --vllm-model,
# --state-dir, --adapter-dir) or the environment (CL_S3_PORT, CL_MLFLOW_PORT, CL_PREFECT_PORT,
# CL_PREFECT_WORKER_PORT, CL_VLLM_PORT, CL_VLLM_MODEL, CL_STACK_DIR, CL_ADAPTER_DIR); see
# `infra/stack.sh --help`. Implementation: cl_core/stack/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${CL_CORE_VENV:-$root/.venv}/bin/python"
if [[ ! -x "$py" ]]; then
  echo "error: no Python environment at ${py%/bin/python}; run 'bash infra/setup.sh' first (or set CL_CORE_VENV)" >&2
  exit 2
fi
cd "$root"
exec "$py" -m cl_core.stack "$@"
