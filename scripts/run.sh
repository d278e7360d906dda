#!/usr/bin/env bash
# Set everything up and start lmscope's web app (`lmscope serve`) on the embedded default model;
# it prints the URL to open (http://127.0.0.1:8000/). Extra arguments replace the default command,
# e.g. scripts/run.sh lens "The keys to the cabinet", or scripts/run.sh serve --port 8080.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then
  set -- serve
fi
exec .venv/bin/lmscope "$@"
