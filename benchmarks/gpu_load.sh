#!/usr/bin/env bash
# End to end on a GPU machine with full-size random weights: write the checkpoint, start the server
# in its own process, run benchmarks/load.py against it, profile the server with py-spy meanwhile.
#
#   OUT=out CLIENTS=1,8,32,64 PROFILE_CLIENTS=32 STAGGER_S=18 TRACE_CLIENTS=64 bash benchmarks/gpu_load.sh
#
# SERVER_ARGS are added to the server's command line (e.g. "--codec-dtype float16").
# Writes $OUT/load.json + load.png (and with STAGGER_S the same levels with client starts spread over
# that many seconds: $OUT/load_staggered.json + .png), $OUT/server.log, the server's /metrics at the
# end ($OUT/metrics.txt) and, when py-spy is installed, the server's profile during a level of
# PROFILE_CLIENTS clients from PROFILE_DELAY_S after its clients start for PROFILE_S seconds (the first turns'
# ends: $OUT/pyspy_all.txt: every non-idle sample, $OUT/pyspy_gil.txt: the thread holding the GIL),
# as collapsed stacks (the worker process included: --subprocesses). With TRACE_CLIENTS, after that server has stopped, a level of that many clients
# runs against a server embedded in the load script, with a kernel trace of it (load.py --kernel-trace)
# from TRACE_DELAY_S after its clients start for TRACE_S seconds: $OUT/load_traced.json and the trace's
# summary, $OUT/trace_summary.txt + .json (benchmarks/trace_summary.py).
set -euo pipefail
OUT=${OUT:-out}
CKPT=${CKPT:-/tmp/vita_full_ckpt}
CLIENTS=${CLIENTS:-1,8,32,64}
PROFILE_CLIENTS=${PROFILE_CLIENTS:-}
PORT=${PORT:-8765}
WAV=${WAV:-../shared/audio/en_hello.wav}
LOAD_ARGS=${LOAD_ARGS:---gap-s 16 --vary-speech 0.4}  # 16 s between turns (a reply ends before the next utterance), turns of varied length
SERVER_ARGS=${SERVER_ARGS:-}
STAGGER_S=${STAGGER_S:-}
PROFILE_DELAY_S=${PROFILE_DELAY_S:-4.5}
PROFILE_S=${PROFILE_S:-3}
TRACE_CLIENTS=${TRACE_CLIENTS:-}
TRACE_DELAY_S=${TRACE_DELAY_S:-4.5}
TRACE_S=${TRACE_S:-4}
mkdir -p "$OUT"

if [ ! -f "$CKPT/config.json" ]; then
  start=$SECONDS
  python -m vita.tiny_checkpoint --size full --device cuda "$CKPT"
  echo "checkpoint written in $((SECONDS - start)) s"
fi
python -m server.cli --checkpoint "$CKPT" --device cuda --max-sessions 64 --port "$PORT" $SERVER_ARGS >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
start=$SECONDS
until python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/readyz')" 2>/dev/null; do
  kill -0 $SERVER 2>/dev/null || { tail -40 "$OUT/server.log"; exit 1; }
  sleep 2
done
echo "server ready after $((SECONDS - start)) s"

STARTED=/tmp/load_level_started
rm -f "$STARTED"
load() {  # load LEVELS JSON (no $STARTED left behind: a waiter started before the next level waits for it)
  python -m benchmarks.load --url "ws://127.0.0.1:$PORT/ws" --wav "$WAV" --clients "$1" --json "$2" \
    --started-file "$STARTED" $LOAD_ARGS
  rm -f "$STARTED"
}
after_start() {  # after_start SECONDS: return that long after the level's clients started
  until [ -f "$STARTED" ]; do sleep 0.05; done
  sleep "$1"
}
load "$CLIENTS" "$OUT/load.json"
if [ -n "$STAGGER_S" ]; then  # the same levels again with the clients' starts spread over STAGGER_S
  LOAD_ARGS="$LOAD_ARGS --stagger-s $STAGGER_S" load "$CLIENTS" "$OUT/load_staggered.json"
fi
if [ -n "$PROFILE_CLIENTS" ] && command -v py-spy >/dev/null; then
  spy() {  # spy OUTFILE [--gil]: the server's stacks at 250 Hz from PROFILE_DELAY_S for PROFILE_S seconds
    after_start "$PROFILE_DELAY_S"
    py-spy record --pid $SERVER --subprocesses --nonblocking --rate 250 --format raw --threads --duration "$PROFILE_S" -o "$@"
  }
  spy "$OUT/pyspy_all.txt" & SPY_ALL=$!
  spy "$OUT/pyspy_gil.txt" --gil & SPY_GIL=$!
  load "$PROFILE_CLIENTS" "$OUT/load_profiled.json"
  wait $SPY_ALL $SPY_GIL || true
fi
python -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$PORT/metrics').read().decode())" >"$OUT/metrics.txt"
if [ -n "$TRACE_CLIENTS" ]; then
  kill $SERVER; wait $SERVER || true
  TRACE=/tmp/kernel_trace.json
  python -m benchmarks.load --checkpoint "$CKPT" --device cuda --wav "$WAV" --clients "$TRACE_CLIENTS" $LOAD_ARGS \
    --kernel-trace "$TRACE" --trace-delay-s "$TRACE_DELAY_S" --trace-s "$TRACE_S" --json "$OUT/load_traced.json"
  python -m benchmarks.trace_summary "$TRACE" --json "$OUT/trace_summary.json" >"$OUT/trace_summary.txt" || true
fi
