#!/usr/bin/env bash
# Run the docs/results/ protocol of every CPU benchmark suite and publish the reports.
#
# For each suite: `polytask bench SUITE ...` (resumable: re-running skips finished runs), then
# copy report.md, report.html, summary.json and plots/*.png from results/<dir>/ into
# docs/results/<suite>/, and write docs/results/README.md indexing them with the exact commands.
#
# Usage:  scripts/run_results.sh                 # every CPU suite
#         SUITES="toy census" scripts/run_results.sh
#         RESULTS=/tmp/benchres scripts/run_results.sh   # where the raw runs go (default results)
#         DRY_RUN=1 scripts/run_results.sh       # print the commands only
#         QUICK="qm9 multi_mnist" scripts/run_results.sh  # these suites with --quick (default: qm9)
#
# Protocols (see docs/benchmarks.md; every one runs >= 8 methods over 3 seeds):
#   toy                  the papers' protocol (35,000 Adam steps); --seeds 3: seed 0 the
#                        published starts, seeds 1-2 jittered starts
#   multi_mnist, multi_fashion, multi_fashion_mnist, census, rf1, reviews
#                        the full protocol (the suite's default)
#   qm9                  --quick: the full QM9 protocol (110k molecules, 300 epochs) is a GPU
#                        protocol; on 2 CPU cores only the CI-sized one fits
# Estimated run time on a quiet 2-core machine: see docs/benchmarks.md ("Run times").
set -euo pipefail

cd "$(dirname "$0")/.."
POLYTASK=${POLYTASK:-.venv/bin/polytask}
RESULTS=${RESULTS:-results}
OUT=${OUT:-docs/results}
SUITES=${SUITES:-"toy multi_mnist multi_fashion multi_fashion_mnist qm9 census rf1 reviews"}
DRY_RUN=${DRY_RUN:-0}

QUICK=${QUICK:-"qm9"}  # suites run with their quick protocol

args_for() {
  local quick=""
  case " $QUICK " in *" $1 "*) quick=" --quick" ;; esac
  case "$1" in
    toy) echo "--seeds 3$quick" ;;
    *) echo "${quick# }" ;;
  esac
}

dir_for() {  # results/<suite> for the full protocol, results/<suite>-quick for --quick
  case " $(args_for "$1") " in
    *" --quick "*) echo "$1-quick" ;;
    *) echo "$1" ;;
  esac
}

mkdir -p "$OUT"
declare -a ROWS=()
for suite in $SUITES; do
  cmd="polytask bench $suite $(args_for "$suite") --results $RESULTS --no-progress"
  cmd=${cmd//  / }
  echo ">>> $cmd" >&2
  if [[ "$DRY_RUN" == 1 ]]; then
    continue
  fi
  start=$(date +%s)
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  # shellcheck disable=SC2086
  "$POLYTASK" bench "$suite" $(args_for "$suite") --results "$RESULTS" --no-progress
  secs=$(( $(date +%s) - start ))
  src="$RESULTS/$(dir_for "$suite")"
  dst="$OUT/$suite"
  rm -rf "$dst"
  mkdir -p "$dst/plots"
  cp "$src/report.md" "$src/report.html" "$src/summary.json" "$dst/"
  if compgen -G "$src/plots/*.png" > /dev/null; then
    cp "$src"/plots/*.png "$dst/plots/"
  fi
  printf '%s\t%s\t%s\t%s\n' "$cmd" "$secs" "$load" "$(date -u +%Y-%m-%d)" > "$dst/run.tsv"
done

if [[ "$DRY_RUN" == 1 ]]; then
  exit 0
fi
for f in "$OUT"/*/run.tsv; do
  [[ -e "$f" ]] || continue
  suite=$(basename "$(dirname "$f")")
  IFS=$'\t' read -r cmd secs load day < "$f"
  ROWS+=("| [$suite]($suite/report.md) ([HTML]($suite/report.html)) | \`$cmd\` | ${secs} s | $load | $day |")
done

{
  echo "# Benchmark results"
  echo
  echo "One real run of each CPU suite, >= 8 methods over 3 seeds, produced by"
  echo "\`scripts/run_results.sh\` ($(nproc) CPUs, $(uname -sm))."
  echo "Protocols, how to read the reports and the comparison with published numbers:"
  echo "[docs/benchmarks.md](../benchmarks.md)."
  echo
  echo "| suite | command | wall time | load average at start (1, 5, 15 min) | date (UTC) |"
  echo "|---|---|---|---|---|"
  for row in "${ROWS[@]}"; do
    echo "$row"
  done
  echo
  echo "Re-running a command reuses the finished runs stored under \`$RESULTS/\` and only"
  echo "re-renders the report; delete that directory to train again."
} > "$OUT/README.md"
echo "wrote $OUT/README.md" >&2
