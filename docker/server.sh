#!/bin/sh
# One server replica. The first replica to get the lock makes the signing keys (in the
# volume the replicas share) and migrates the schema; the others find both done.
set -eu
: "${DIFFCAST_KEYS_DIR:?set DIFFCAST_KEYS_DIR to the keys volume}"
: "${DIFFCAST_PORT:?set DIFFCAST_PORT}"
mkdir -p "$DIFFCAST_KEYS_DIR"
# shellcheck disable=SC2016 # expanded by the inner shell
flock "$DIFFCAST_KEYS_DIR/.init.lock" sh -ec '
  if [ ! -e "$DIFFCAST_KEYS_DIR/online/1.root.json" ]; then diffcast keys init; fi
  diffcast server migrate'
exec diffcast server run --host 127.0.0.1 --port "$DIFFCAST_PORT" \
  --workers "${DIFFCAST_WORKERS:-1}" --no-migrate
