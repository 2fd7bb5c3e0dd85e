#!/usr/bin/env bash
# Instructions per request for every row of the overhead bench, counted by callgrind.
#
#   benches/instructions.sh                      # the default build
#   benches/instructions.sh --all-features       # every feature compiled in
#   benches/instructions.sh --all-features --gate 2
#
# Builds the `instructions` bench target (optimized, as `cargo bench` does), runs each
# row at two request counts under `valgrind --tool=callgrind` and prints the difference
# per request, so start-up and the runtime's set-up cancel out. Instruction counts do
# not move with machine load, so a regression check can hold them: with `--gate X` the
# script fails if `concurrent` costs more than X times the floor's instructions per
# request on the hit or the miss path. Other arguments go to cargo (feature flags).
set -euo pipefail
cd "$(dirname "$0")/.."

gate=""
flags=()
while [ $# -gt 0 ]; do
    case "$1" in
        --gate) gate=$2; shift 2 ;;
        *) flags+=("$1"); shift ;;
    esac
done
# Request counts: the trivial rows cost a few hundred instructions, the HTTP rows tens
# of thousands, so the HTTP rows run fewer.
n1=${N1:-1000}; n2=${N2:-11000}
http_n1=${HTTP_N1:-200}; http_n2=${HTTP_N2:-1200}

command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 2; }
exe=$(cargo bench --no-run --bench instructions ${flags[@]+"${flags[@]}"} --message-format=json \
    | grep -o '"executable":"[^"]*"' | tail -n 1 | cut -d'"' -f4)
[ -x "$exe" ] || { echo "could not build the instructions bench" >&2; exit 2; }
build=$("$exe" --build)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Instructions executed by the whole process serving `$3` requests of row `$1`, path `$2`.
count() {
    valgrind --tool=callgrind --callgrind-out-file="$tmp/out" "$exe" "$1" "$2" "$3" \
        >/dev/null 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 2; }
    awk '/^(summary|totals):/ { print $2; exit }' "$tmp/out"
}

declare -A per
echo "instructions per request, build: $build, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo
echo "| row | build | path | instructions/request | × floor |"
echo "|---|---|---|---:|---:|"
while read -r row path; do
    if [[ $row == http_* ]]; then a=$http_n1; b=$http_n2; floor=http_bare; else a=$n1; b=$n2; floor=floor; fi
    low=$(count "$row" "$path" "$a")
    high=$(count "$row" "$path" "$b")
    per[$row/$path]=$(awk -v l="$low" -v h="$high" -v n=$((b - a)) 'BEGIN { printf "%.0f", (h - l) / n }')
    ratio=$(awk -v x="${per[$row/$path]}" -v f="${per[$floor/$path]:-0}" \
        'BEGIN { if (f > 0) printf "%.2f", x / f; else print "—" }')
    echo "| \`$row\` | $build | $path | ${per[$row/$path]} | $ratio |"
done < <("$exe" --list)

if [ -n "$gate" ]; then
    status=0
    for path in hit miss; do
        if ! awk -v x="${per[concurrent/$path]}" -v f="${per[floor/$path]}" -v g="$gate" \
            'BEGIN { exit !(x <= g * f) }'; then
            echo "FAIL: concurrent/$path costs ${per[concurrent/$path]} instructions per request, over $gate × the floor's ${per[floor/$path]}" >&2
            status=1
        fi
    done
    [ $status -eq 0 ] && echo "gate: concurrent within $gate × the floor on both paths ($build)"
    exit $status
fi
