#!/usr/bin/env bash
# The simulated devices. They wait until the model has a release (so that the operator
# decides what they get), then run `diffcast fleet simulate` spread over every server
# replica until all converge. The outcome stays in the volume (status, report.json,
# fleet.log); a restarted stack finds it there and does not run the fleet again.
set -euo pipefail
: "${DIFFCAST_TOKEN:?set DIFFCAST_TOKEN (an admin token)}"
: "${FLEET_SERVERS:?set FLEET_SERVERS (space-separated server URLs)}"
dir=${FLEET_DIR:-/var/lib/diffcast-fleet}
model=${FLEET_MODEL:-asr}
read -r -a servers <<<"$FLEET_SERVERS"
mkdir -p "$dir"
status() { echo "$1" >"$dir/status"; echo "fleet: $1"; }

if [[ -f $dir/report.json ]]; then
  echo "fleet: already ran (status $(cat "$dir/status")); report in $dir/report.json"
  exec sleep infinity
fi
status waiting
until python3 /opt/diffcast/probe.py release "${servers[0]}" "$model"; do sleep 1; done
status running
args=(--server "${servers[0]}")
for url in "${servers[@]:1}"; do args+=(--fallback-server "$url"); done
if diffcast fleet simulate "${args[@]}" --model "$model" \
    --devices "${FLEET_DEVICES:-16}" --start-versions "${FLEET_START_VERSIONS:-0,1,none}" \
    --concurrency "${FLEET_CONCURRENCY:-4}" --timeout "${FLEET_TIMEOUT:-600}" \
    --work-dir "$dir/devices" --report "$dir/report.tmp" 2>&1 | tee "$dir/fleet.log"; then
  mv "$dir/report.tmp" "$dir/report.json"
  status converged
else
  [[ -f $dir/report.tmp ]] && mv "$dir/report.tmp" "$dir/report.json"
  status failed
fi
exec sleep infinity
