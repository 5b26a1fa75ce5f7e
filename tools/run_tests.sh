#!/usr/bin/env bash
# Runs the test suites one after another, printing how long each took; fails if any failed.
# Each suite runs on MEDLEDGER_TEST_WORKERS pytest-xdist workers (default: the cores, at most 4),
# a test file's tests on one worker: most integration tests wait on brokers, chains and timers,
# so two files at a time nearly halve the time even on two cores. MEDLEDGER_TEST_WORKERS=0 runs
# in one process (for -s or --pdb).
set -uo pipefail
cd "$(dirname "$0")/.."
cores=$(nproc 2>/dev/null || echo 2)
workers=${MEDLEDGER_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
suites=("libs" "services" "tests")
failed=()
total_start=$(date +%s)
for suite in "${suites[@]}"; do
  [ -d "$suite" ] || continue
  start=$(date +%s)
  printf '\n==> suite %s\n' "$suite"
  # The ten slowest tests of each suite, so the CI budget can be watched.
  uv run --frozen pytest -q --durations=10 --durations-min=5 -n "$workers" --dist loadfile "$suite" "$@"
  code=$?
  # pytest exits 5 when a folder holds no tests yet: not a failure of the suite.
  if [ $code -ne 0 ] && [ $code -ne 5 ]; then failed+=("$suite"); fi
  printf '==> suite %s took %ss (exit %s)\n' "$suite" "$(( $(date +%s) - start ))" "$code"
done
if [ "$workers" = 0 ]; then how="one process"; else how="$workers workers"; fi
printf '\n==> all suites took %ss (%s)\n' "$(( $(date +%s) - total_start ))" "$how"
if [ ${#failed[@]} -ne 0 ]; then
  echo "==> failed suites: ${failed[*]}"
  exit 1
fi
