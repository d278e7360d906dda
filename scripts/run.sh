#!/usr/bin/env bash
# Set everything up and run lmscope's main job on the embedded default model.
# Extra arguments replace the default command, e.g. scripts/run.sh lens "The keys to the cabinet".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then
  set -- lens "The keys to the cabinet"
fi
exec .venv/bin/lmscope "$@"
