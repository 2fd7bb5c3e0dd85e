#!/usr/bin/env bash
# The overhead bench's table, as the median of several whole runs.
#
#   benches/median.sh                      # 5 runs, the default build
#   benches/median.sh --all-features 9     # 9 runs, every feature compiled in
#
# On a shared or virtual machine a run now and then loses a second to a neighbour, and
# every row timed in that second comes out 20–60 % slow; which rows, changes from run
# to run. Each figure here is the median of that row's figures over all the runs, and
# each ratio is that median over the floor's median. The runs' own tables are kept in
# target/overhead-runs/ (run-N.txt). Needs python3.
set -euo pipefail
cd "$(dirname "$0")/.."

flags=()
runs=5
for arg in "$@"; do
    case "$arg" in
        -*) flags+=("$arg") ;;
        *) runs=$arg ;;
    esac
done

dir=target/overhead-runs
rm -rf "$dir" && mkdir -p "$dir"
cargo bench --no-run --bench overhead ${flags[@]+"${flags[@]}"} 2>/dev/null
for i in $(seq 1 "$runs"); do
    cargo bench --bench overhead ${flags[@]+"${flags[@]}"} 2>/dev/null >"$dir/run-$i.txt"
    grep '^build:' "$dir/run-$i.txt" >&2
done

python3 - "$dir"/run-*.txt <<'PY'
import re, statistics, sys

rows, order = {}, []
for path in sys.argv[1:]:
    for line in open(path):
        if line.startswith("| `"):
            # Split on the table's bars, not on the escaped ones inside a cell.
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if cells[0] not in rows:
                rows[cells[0]] = []
                order.append(cells[0])
            rows[cells[0]].append(cells)

def median(name, column):
    values = [float(r[column]) for r in rows[name] if r[column] != "—"]
    return statistics.median(values) if values else None

def show(value, base):
    if value is None:
        return "—", "—"
    return f"{value:.1f}", f"{value / base:.2f}"

floor = {3: median("`floor`", 3), 5: median("`floor`", 5)}
http = {3: median("`http_bare`", 3), 5: median("`http_bare`", 5)} if "`http_bare`" in rows else floor
print(f"median of {len(sys.argv) - 1} runs")
print()
print("| row | build | does | hit ns | hit × floor | miss ns | miss × floor | allocs/req hit, miss | future bytes |")
print("|---|---|---|---:|---:|---:|---:|---|---:|")
for name in order:
    first = rows[name][0]
    base = http if name.startswith("`http") else floor
    hit, hit_ratio = show(median(name, 3), base[3])
    miss, miss_ratio = show(median(name, 5), base[5])
    print(f"| {name} | {first[1]} | {first[2]} | {hit} | {hit_ratio} | {miss} | {miss_ratio} | {first[7]} | {first[8]} |")
PY
