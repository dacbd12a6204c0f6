#!/usr/bin/env bash
# The test command: install what is needed, lint, then run the whole suite.
# pytest's exit code is this script's (5, "no tests ran", is a failure too).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
.venv/bin/ruff check pytest_isolate tests bench examples
exec .venv/bin/python -m pytest -ra "$@"
