#!/usr/bin/env bash
# Two code trees compared on one GPU machine in one run. GPU machines of one pool differ (the same
# code gave 1.0 s and 1.6 s first audio at 64 clients on two H200s), so only runs on one machine
# compare code. Each round starts tree A's server, loads it (benchmarks/gpu_load.sh, the checkpoint
# written once and shared), then tree B's the same way. OUT must be an absolute path.
#
#   git archive REV_A | tar -x -C /tmp/a; git archive REV_B | tar -x -C /tmp/b
#   OUT=$PWD/out A=/tmp/a B=/tmp/b CLIENTS=64 ROUNDS=1 bash benchmarks/gpu_ab.sh
#
# A_ARGS and B_ARGS are each side's server arguments (gpu_load.sh's SERVER_ARGS), so one tree can be
# compared with itself under another setting: B=$A B_ARGS="--codec-dtype float16".
# Writes $OUT/A1, $OUT/B1, ... (each what gpu_load.sh writes); about 150 s per tree and round for one
# 64-client level of 3 turns, plus 45 s for the checkpoint.
set -euo pipefail
: "${OUT:?OUT (absolute) is needed}" "${A:?A: the first tree}" "${B:?B: the second tree}"
ROUNDS=${ROUNDS:-1}
HERE=$(cd "$(dirname "$0")" && pwd)  # this checkout's gpu_load.sh loads both trees
for round in $(seq "$ROUNDS"); do
  for side in A B; do
    tree=${!side} args_name=${side}_ARGS
    echo "== $side$round: $tree"
    (cd "$tree" && PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}" SERVER_ARGS="${!args_name:-}" OUT="$OUT/$side$round" bash "$HERE/gpu_load.sh")
  done
done
