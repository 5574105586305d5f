#!/usr/bin/env bash
# Several code trees (or settings) on one GPU at once: every side's server is started together, side
# by side on the GPU (their start-ups overlap: about 70 s for three instead of 70 s each), then each
# level is run against one server at a time while the others sit idle. GPU machines of one pool
# differ, so only sides of one run compare code.
#
#   OUT=$PWD/out CLIENTS=64,32 bash benchmarks/gpu_side_by_side.sh main=$PWD branch=/tmp/b
#
# Each argument is NAME=TREE; NAME_ARGS (e.g. main_ARGS="--no-worker-process") adds server arguments,
# NAME_ENV (e.g. grow_ENV="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True") environment variables,
# NAME_LOAD_ARGS (e.g. off_LOAD_ARGS="--speculative-ms 0") load.py arguments after LOAD_ARGS.
# Levels run level by level, each side in turn (all sides at 64 before any at 32; a level named again
# runs again, written as load64_r2.json and so on), and a level is
# started only before LIMIT_S seconds (default 400) so that the run ends inside a 10-minute call.
# VITA_MAX_CONTEXT_TOKENS defaults to 2048 here (three full-size servers then take about 100 GiB
# of an H200's 141). Writes $OUT/NAME/load<clients>.{json,txt,png}, server.log and the server's
# `thread_activity` lines and /metrics after each level (activity<clients>.txt, metrics<clients>.txt). PROFILE=NAME records that side's
# server with py-spy (its worker process included) during its first level, from PROFILE_DELAY_S
# after the clients start for PROFILE_S seconds: every non-idle sample ($OUT/NAME/pyspy_all.txt) and
# the GIL holder's (pyspy_gil.txt), as collapsed stacks per thread. A server's first burst of users
# runs slower than later ones (benchmarks/README.md, calls 15 to 17): WARM_UP=64 first gives each
# server one turn of 64 clients, written as warmup.{json,txt} and kept out of the levels.
set -uo pipefail
: "${OUT:?OUT (absolute) is needed}"
CLIENTS=${CLIENTS:-64}
DEVICE=${DEVICE:-cuda}
CKPT=${CKPT:-/tmp/vita_full_ckpt}
WAV=${WAV:-../shared/audio/en_hello.wav}
LOAD_ARGS=${LOAD_ARGS:---gap-s 16 --vary-speech 0.4}  # turns of varied length end spread out, as real ones do
LIMIT_S=${LIMIT_S:-400}
PROFILE=${PROFILE:-}
PROFILE_DELAY_S=${PROFILE_DELAY_S:-4.5}
PROFILE_S=${PROFILE_S:-4}
WARM_UP=${WARM_UP:-}
export VITA_MAX_CONTEXT_TOKENS=${VITA_MAX_CONTEXT_TOKENS:-2048}
mkdir -p "$OUT"
[ $# -ge 1 ] || { echo "usage: $0 NAME=TREE [NAME=TREE ...]"; exit 2; }

checkpoint=()
if [ "$DEVICE" != cpu ]; then
  [ -f "$CKPT/config.json" ] || python -m vita.tiny_checkpoint --size full --device "$DEVICE" "$CKPT"
  checkpoint=(--checkpoint "$CKPT")
fi

names=() ports=() pids=()
port=8765
for side in "$@"; do
  name=${side%%=*} tree=${side#*=} args_name=${side%%=*}_ARGS env_name=${side%%=*}_ENV
  mkdir -p "$OUT/$name"
  if python -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null; then
    echo "port $port is taken (a server left running?)"; exit 1
  fi
  (cd "$tree" && PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}" exec env ${!env_name:-} python -m server.cli "${checkpoint[@]}" \
    --device "$DEVICE" --max-sessions 64 --port $port ${!args_name:-} >"$OUT/$name/server.log" 2>&1) &
  names+=("$name") ports+=($port) pids+=($!)
  port=$((port + 1))
done
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for i in "${!names[@]}"; do
  until python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:${ports[$i]}/readyz')" 2>/dev/null; do
    kill -0 "${pids[$i]}" 2>/dev/null || { echo "${names[$i]}'s server exited:"; tail -20 "$OUT/${names[$i]}/server.log"; exit 1; }
    sleep 2
  done
done
for i in "${!names[@]}"; do  # ready, and not some other process on its port
  kill -0 "${pids[$i]}" 2>/dev/null || { echo "${names[$i]}'s server exited:"; tail -20 "$OUT/${names[$i]}/server.log"; exit 1; }
done
echo "servers ready after $SECONDS s"
if [ -n "$WARM_UP" ]; then
  for i in "${!names[@]}"; do
    python -m benchmarks.load --url "ws://127.0.0.1:${ports[$i]}/ws" --wav "$WAV" --clients "$WARM_UP" --turns 1 \
      --json "$OUT/${names[$i]}/warmup.json" $LOAD_ARGS >"$OUT/${names[$i]}/warmup.txt" 2>&1
    echo "== ${names[$i]}, warm-up of $WARM_UP clients, one turn (done at $SECONDS s)"
    grep -v '^(\|^ srv\|^wrote' "$OUT/${names[$i]}/warmup.txt"
  done
fi

for clients in ${CLIENTS//,/ }; do
  for i in "${!names[@]}"; do
    name=${names[$i]}
    if [ $SECONDS -ge "$LIMIT_S" ]; then echo "$name at $clients clients: skipped (past LIMIT_S)"; continue; fi
    run=$clients round=1  # a level named twice (CLIENTS=64,32,64) runs again: load64_r2.json
    while [ -e "$OUT/$name/load$run.json" ]; do round=$((round + 1)) run=${clients}_r$round; done
    started=/tmp/side_by_side_started_$name$run spies=()
    rm -f "$started"
    if [ "$name" = "$PROFILE" ] && [ ! -f "$OUT/$name/pyspy_all.txt" ]; then
      for kind in all gil; do
        (until [ -f "$started" ]; do sleep 0.05; done; sleep "$PROFILE_DELAY_S"
         py-spy record --pid "${pids[$i]}" --subprocesses --nonblocking --rate 250 --format raw --threads \
           --duration "$PROFILE_S" -o "$OUT/$name/pyspy_$kind.txt" $([ $kind = gil ] && echo --gil) \
           >"$OUT/$name/pyspy_$kind.log" 2>&1) & spies+=($!)
      done
    fi
    load_args_name=${name}_LOAD_ARGS
    python -m benchmarks.load --url "ws://127.0.0.1:${ports[$i]}/ws" --wav "$WAV" --clients "$clients" \
      --started-file "$started" --json "$OUT/$name/load$run.json" $LOAD_ARGS ${!load_args_name:-} >"$OUT/$name/load$run.txt" 2>&1
    [ ${#spies[@]} -eq 0 ] || wait "${spies[@]}"
    grep -h thread_activity "$OUT/$name/server.log" | tail -12 >"$OUT/$name/activity$run.txt"
    python -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:${ports[$i]}/metrics').read().decode())" \
      >"$OUT/$name/metrics$run.txt" 2>&1  # cumulative since start-up (the worker loop lag histogram among them)
    echo "== $name, $clients clients (done at $SECONDS s)"
    grep -v '^(\|^ srv\|^wrote' "$OUT/$name/load$run.txt"
  done
done
