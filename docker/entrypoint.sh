#!/bin/sh
# vita-server in the container: the checkpoint mounted at $VITA_CHECKPOINT_MOUNT if it holds one
# (a config.json), else the tiny random checkpoint. Arguments go to vita-server.
set -eu
mount="${VITA_CHECKPOINT_MOUNT:-/checkpoint}"
if [ -f "$mount/config.json" ]; then
  exec vita-server --checkpoint "$mount" "$@"
fi
echo "vita-entrypoint: no checkpoint at $mount (no config.json): running the tiny random checkpoint" >&2
exec vita-server "$@"
