#!/usr/bin/env bash
# Issue 5's speed check: `qlora merge` of BASE against `cp -r` of the same BASE, in one run,
# alternating. Each timed command runs from a `sync`ed state and is timed up to the end of a
# following `sync`: qlora fsyncs every output file before renaming it into place (a crash never
# leaves a half-written file under the final name) and cp does not, so both are timed until
# their bytes are on disk. Prints each run and the medians. Usage:
#   Benchmarks/merge-vs-cp.sh BASE ADAPTER [RUNS] [extra qlora merge options...]
# Scratch outputs go beside BASE (same file system) and are removed.
set -euo pipefail
base=$1 adapter=$2 runs=${3:-5}
shift $(( $# < 3 ? $# : 3 ))
qlora=${QLORA:-$(dirname "$0")/../.build/release/qlora}
out=$base.bench-merged copy=$base.bench-copy
trap 'rm -rf "$out" "$copy"' EXIT
now() { date +%s.%N; }
merges=() copies=()
for i in $(seq "$runs"); do
  rm -rf "$out" "$copy"; sync
  t0=$(now); "$qlora" merge "$base" "$adapter" "$out" "$@" >/dev/null; sync; t1=$(now)
  t2=$(now); cp -r "$base" "$copy"; sync; t3=$(now)
  m=$(echo "$t1 - $t0" | bc) c=$(echo "$t3 - $t2" | bc)
  merges+=("$m") copies+=("$c")
  printf 'run %d: merge+sync %.2f s, cp+sync %.2f s\n' "$i" "$m" "$c"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
mm=$(median "${merges[@]}") mc=$(median "${copies[@]}")
printf 'median of %d: merge+sync %.2f s, cp+sync %.2f s, ratio %.2fx (target <= 1.5x)\n' "$runs" "$mm" "$mc" "$(echo "$mm / $mc" | bc -l)"
