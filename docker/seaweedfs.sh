#!/bin/sh
# SeaweedFS (master, volume server, filer, S3 gateway) on 127.0.0.1, data in /data,
# one static S3 identity from the environment, telemetry off.
set -eu
: "${S3_ACCESS_KEY:?set S3_ACCESS_KEY}"
: "${S3_SECRET_KEY:?set S3_SECRET_KEY}"
data=${SEAWEED_DATA:-/data}
mkdir -p "$data/store" "$data/tmp"
cat > "$data/s3.json" <<JSON
{"identities": [{"name": "diffcast",
  "credentials": [{"accessKey": "$S3_ACCESS_KEY", "secretKey": "$S3_SECRET_KEY"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON
cd "$data"
export TMPDIR="$data/tmp"
exec weed -logtostderr server \
  -dir="$data/store" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -master.port="${MASTER_PORT:-9333}" -master.port.grpc="${MASTER_GRPC_PORT:-19333}" \
  -volume.port="${VOLUME_PORT:-9340}" -volume.port.grpc="${VOLUME_GRPC_PORT:-19340}" \
  -filer -filer.port="${FILER_PORT:-8888}" -filer.port.grpc="${FILER_GRPC_PORT:-18888}" \
  -s3 -s3.port="${S3_PORT:-8333}" -s3.port.grpc="${S3_GRPC_PORT:-18333}" \
  -s3.config="$data/s3.json" -s3.port.iceberg=0 -s3.port.lance=0 \
  -master.telemetry=false -master.volumeSizeLimitMB=256 -volume.max=64 \
  -volume.preStopSeconds=0 -iam=false -webdav=false
