#!/usr/bin/env bash
# Runs the test suites one after another, printing how long each took; fails if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
suites=("libs" "services" "tests")
failed=()
total_start=$(date +%s)
for suite in "${suites[@]}"; do
  [ -d "$suite" ] || continue
  start=$(date +%s)
  printf '\n==> suite %s\n' "$suite"
  # The ten slowest tests of each suite, so the CI budget can be watched.
  uv run --frozen pytest -q --durations=10 --durations-min=5 "$suite" "$@"
  code=$?
  # pytest exits 5 when a folder holds no tests yet: not a failure of the suite.
  if [ $code -ne 0 ] && [ $code -ne 5 ]; then failed+=("$suite"); fi
  printf '==> suite %s took %ss (exit %s)\n' "$suite" "$(( $(date +%s) - start ))" "$code"
done
printf '\n==> all suites took %ss\n' "$(( $(date +%s) - total_start ))"
if [ ${#failed[@]} -ne 0 ]; then
  echo "==> failed suites: ${failed[*]}"
  exit 1
fi
