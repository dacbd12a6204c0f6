#!/usr/bin/env bash
# The demo: a small suite showing every tier, a crash, a timeout, an escape and an
# overuse report. Some demo tests fail on purpose; the demo itself succeeds when the
# plugin reported them.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
set +e  # setup.sh turned -e on; the demo's own failures are expected
.venv/bin/python -m pytest examples -v -p no:cacheprovider --isolate-report=examples-report.json "$@"
code=$?
echo
echo "demo: pytest exited $code (the demo's failing tests fail on purpose); JSON report: examples-report.json"
[ "$code" -le 1 ] || exit "$code"
