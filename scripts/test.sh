#!/usr/bin/env bash
# Set everything up and run the whole check: format, lint, tests (browser tests in headless Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1; then
  echo "lmscope: installing Debian's chromium for the browser tests" >&2
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest "$@"
