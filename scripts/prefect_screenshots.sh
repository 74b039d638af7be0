#!/usr/bin/env bash
# The README's Prefect screenshots: a real `prefect server` on 127.0.0.1 (a free port, a
# private PREFECT_HOME), `refocus flow preprocess` on a tiny synthetic corpus with one file
# that is not a video, then headless Chromium (Debian's `chromium` package) on the flow
# run's page and on the pages of its failures and summary artifacts.
#
#   scripts/prefect_screenshots.sh [OUT_DIR]      # default: docs/ (prefect-flow-run.png,
#                                                 # prefect-artifacts.png, prefect-summary.png)
#
# Needs: refocus and prefect on PATH (or REFOCUS / PREFECT set), chromium, curl.
set -euo pipefail

OUT_DIR=$(realpath "${1:-docs}")
REFOCUS=${REFOCUS:-refocus}
PREFECT=${PREFECT:-prefect}
BUDGET=${BUDGET:-20000}  # ms of virtual time Chromium gives the page's scripts
WORK=$(mktemp -d)
export PREFECT_HOME="$WORK/prefect-home"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_UI_API_URL="$PREFECT_API_URL"
mkdir -p "$OUT_DIR"

"$PREFECT" server start --host 127.0.0.1 --port "$PORT" > "$WORK/server.log" 2>&1 &
SERVER=$!
cleanup() { kill "$SERVER" 2> /dev/null || true; wait "$SERVER" 2> /dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
for _ in $(seq 120); do
    curl -sf "$PREFECT_API_URL/health" > /dev/null && break
    sleep 1
done
curl -sf "$PREFECT_API_URL/health" > /dev/null || { cat "$WORK/server.log"; exit 1; }

# a tiny corpus: four synthetic videos with questions, and one file that is not a video
"$REFOCUS" synth --out "$WORK/corpus" --videos 4 --seed 3 --duration-range 10 12 --events 2 3 --workers 1
echo "meeting notes, not a video" > "$WORK/broken.mp4"
"$REFOCUS" flow preprocess "$WORK/corpus/manifest.jsonl" "$WORK/broken.mp4" \
    --root "$WORK/data" --shard-size 2 --fps 2 --size 96 --workers 2 || test $? -eq 1

RUN=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["flow_run_id"])' \
      "$WORK"/data/flow-runs/*-preprocess.json)
shot() {  # URL FILE
    chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
        --disable-component-update --disable-sync --user-data-dir="$(mktemp -d -p "$WORK")" \
        --window-size=1400,1000 --virtual-time-budget="$BUDGET" --hide-scrollbars \
        --screenshot="$2" "$1" 2> "$WORK/chromium.log" || { cat "$WORK/chromium.log"; exit 1; }
    echo "$2 ← $1"
}
shot "http://127.0.0.1:$PORT/runs/flow-run/$RUN" "$OUT_DIR/prefect-flow-run.png"
artifact() {  # KEY: the id of the run's artifact with that key
    curl -sf -X POST "$PREFECT_API_URL/artifacts/filter" -H 'Content-Type: application/json' \
        -d "{\"flow_runs\": {\"id\": {\"any_\": [\"$RUN\"]}}, \"artifacts\": {\"key\": {\"any_\": [\"$1\"]}}}" \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["id"])'
}
shot "http://127.0.0.1:$PORT/artifacts/artifact/$(artifact refocus-preprocess-failures)" \
    "$OUT_DIR/prefect-artifacts.png"
shot "http://127.0.0.1:$PORT/artifacts/artifact/$(artifact refocus-preprocess-summary)" \
    "$OUT_DIR/prefect-summary.png"
