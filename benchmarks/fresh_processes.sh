#!/usr/bin/env bash
# Cold scoring as a user meets it: RUNS fresh `cli.py score --all-pairs` processes on a random N x D store (LFWPeople-
# like labels and ties: benchmarks.bench_score.write_random_store), each right after this machine's floor
# (../shared/tools/floor.py N D, or FLOOR=PATH); prints one row per process: its metrics.json `seconds`, the floor
# and their ratio. Extra arguments go to `score` (e.g. --backend faiss, --metric cosine).
# Usage: [RUNS=5] [N=3708] [D=1000] [FLOOR=...] bash benchmarks/fresh_processes.sh [SCORE OPTIONS...]
set -euo pipefail
cd "$(dirname "$0")/.."
P=.venv/bin/python
RUNS=${RUNS:-5}; N=${N:-3708}; D=${D:-1000}; FLOOR=${FLOOR:-../shared/tools/floor.py}
[ -f "$FLOOR" ] || { echo "no floor script at $FLOOR (set FLOOR=PATH to ../shared/tools/floor.py)" >&2; exit 2; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
$P -c "from pathlib import Path; from benchmarks.bench_score import write_random_store; write_random_store(Path('$WORK/s.h5'), $N, $D)"
echo "| run | seconds | floor s | x floor | preparation + tiles, ms |"
echo "| --- | --- | --- | --- | --- |"
for i in $(seq 1 "$RUNS"); do
  floor=$($P "$FLOOR" "$N" "$D" | tail -1)
  $P cli.py score "$WORK/s.h5" --all-pairs --no-progress --out "$WORK/r$i" "$@" >/dev/null 2>&1
  $P - "$WORK/r$i/metrics.json" "$floor" "$i" <<'PY'
import json, sys
m, floor = json.load(open(sys.argv[1])), float(sys.argv[2])
print(f"| {sys.argv[3]} | {m['seconds']:.3f} | {floor:.3f} | {m['seconds'] / floor:.2f} | "
      f"{m['seconds_prepare'] * 1e3:.0f}+{m['seconds_tiles'] * 1e3:.0f} |")
PY
done
$P cli.py bench machine 2>/dev/null | grep "^| CPU" || true
