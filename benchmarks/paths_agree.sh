#!/usr/bin/env bash
# Do all the ways of scoring a store give one result? For each STORE: one process, torchrun with 2 ranks, and 3
# `--rows` parts joined by `merge`, compared by benchmarks/same_results.py (histograms and every non-timing
# metric); with REF set to a folder of results named after the stores (an older commit's one-process runs,
# REF/<store stem>), each is also compared with it (REF_FLAG, default --common: only what both versions write,
# tar_at_far aside; --ref for a reference of ddca428 or later: tar_at_far too). METRIC: l2 (default) or cosine
# (a store with score offsets is scored with them). BACKEND=faiss: one process and torchrun with that backend
# (it scores rows held in memory: no `--rows` parts).
# Usage: [METRIC=cosine] [BACKEND=faiss] [REF=DIR [REF_FLAG=--ref]] [WORK=DIR] bash benchmarks/paths_agree.sh STORE.h5...
# (exit 1 when anything differs)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-$(mktemp -d)}
P=.venv/bin/python
M=(--metric "${METRIC:-l2}")
if [ -n "${BACKEND:-}" ]; then M+=(--backend "$BACKEND"); fi
status=0
for store in "$@"; do
  name=$(basename "$store" .h5)
  n=$($P -c "import h5py, sys; print(h5py.File(sys.argv[1], 'r')['embeddings'].shape[0])" "$store")
  a=$((n / 3)); b=$((2 * n / 3))
  $P cli.py score "$store" --all-pairs "${M[@]}" --no-progress --out "$WORK/$name-one" >/dev/null 2>&1
  OMP_NUM_THREADS=1 $P -m torch.distributed.run --standalone --nproc-per-node 2 cli.py score "$store" --all-pairs \
    "${M[@]}" --no-progress --out "$WORK/$name-torchrun2" >/dev/null 2>&1
  if [ -n "${BACKEND:-}" ]; then
    $P -m benchmarks.same_results "$WORK/$name-one" "$WORK/$name-torchrun2" || status=1
    continue
  fi
  for span in 0:$a $a:$b $b:$n; do
    $P cli.py score "$store" --all-pairs "${M[@]}" --rows "$span" --no-progress --out "$WORK/$name-rows-${span%%:*}" \
      >/dev/null 2>&1
  done
  $P cli.py merge "$WORK/$name-rows-$b" "$WORK/$name-rows-0" "$WORK/$name-rows-$a" --out "$WORK/$name-merged" >/dev/null 2>&1
  $P -m benchmarks.same_results "$WORK/$name-one" "$WORK/$name-torchrun2" "$WORK/$name-merged" || status=1
  if [ -n "${REF:-}" ]; then
    $P -m benchmarks.same_results "${REF_FLAG:---common}" "$REF/$name" "$WORK/$name-one" "$WORK/$name-torchrun2" "$WORK/$name-merged" || status=1
  fi
done
echo "results in $WORK"
exit $status
