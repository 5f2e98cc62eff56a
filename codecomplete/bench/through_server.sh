#!/usr/bin/env bash
# The in-process typists and the same typists through the team server (one GPU replica),
# in one run: issue #20's "bench serve --url at 8 and 32 users, within 10% of in-process".
#
#   bash codecomplete/bench/through_server.sh OUT_DIR [MODEL] [USERS]
#
# MODEL: empty for the shipped model (default), or random-7b. USERS: default 8,32.
# Starts `codecomplete serve --exact-new-tokens 16` detached on port 8012, waits for
# /health, runs `bench serve --device cuda --url ... --variants batched-bifurcated,service`,
# then stops the server (its whole process group: Ray's processes too). Needs Ray Serve
# and FastAPI importable (e.g. wheels installed with pip --target, that folder on
# PYTHONPATH) and the package installed. PYTHON picks the interpreter (default python3),
# DEVICE the device (default cuda), PORT the server's port (default 8012), SERVE_ARGS more
# options for the server (e.g. --batching on with DEVICE=cpu, as a GPU replica batches).
# Writes OUT_DIR/through_server[_MODEL].json, the server's log and the bench's progress.
set -u
out=${1:?usage: through_server.sh OUT_DIR [MODEL] [USERS]}
model=${2:-}
users=${3:-8,32}
python=${PYTHON:-python3}
device=${DEVICE:-cuda}  # cpu: to try the script on a machine without a GPU
port=${PORT:-8012}
new_tokens=16
tag=${model:+_$(basename "$model")}
mkdir -p "$out"
model_args=()
[ -n "$model" ] && model_args=(--model "$model")

t0=$(date +%s)
setsid "$python" -m codecomplete serve --device "$device" --runtime torch --replicas 1 --port "$port" \
  --exact-new-tokens "$new_tokens" ${model_args[@]+"${model_args[@]}"} ${SERVE_ARGS:-} >"$out/serve$tag.log" 2>&1 </dev/null &
server=$!
stop_server() {
  kill -INT "$server" 2>/dev/null  # serve's Ctrl-C: a clean shutdown (Ray's own SIGTERM handler aborts)
  for _ in $(seq 1 30); do kill -0 "$server" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$server" 2>/dev/null  # what Ray left of the group
  wait "$server" 2>/dev/null
}
trap stop_server EXIT

"$python" - "$port" "$server" <<'EOF' || { echo "the server did not come up; its log:"; tail -40 "$out/serve$tag.log"; exit 1; }
import os, sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/health"
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        os.kill(int(sys.argv[2]), 0)
    except ProcessLookupError:  # the server exited: its log says why
        sys.exit(1)
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit(1)
EOF
echo "server ready in $(( $(date +%s) - t0 )) s"

t1=$(date +%s)
"$python" -m codecomplete bench serve --device "$device" --url "http://127.0.0.1:$port" ${model_args[@]+"${model_args[@]}"} \
  --variants batched-bifurcated,service --users "$users" --n 4 --new-tokens "$new_tokens" \
  --context-tokens 2048 --keystrokes 15 --max-row-s 10 --json \
  >"$out/through_server$tag.json" 2>"$out/bench$tag.err"
code=$?
echo "bench: exit $code in $(( $(date +%s) - t1 )) s"
tail -12 "$out/bench$tag.err"
exit $code
