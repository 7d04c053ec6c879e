#!/usr/bin/env bash
# The test command of the README. pytest exits 5 when it collects no test: that fails too.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest tests -q --doctest-modules flows "$@"
