#!/usr/bin/env bash
# A real two-node Ray cluster on this machine, for trying `diffgrm submit` and the
# multi-node code paths without a cloud account:
#
#   tools/local_cluster.sh start    # head (node_head) + one worker node (node_worker)
#   tools/local_cluster.sh status   # `ray status` of that cluster
#   tools/local_cluster.sh stop     # stops exactly those two nodes, checks nothing is left
#
# Both nodes listen on 127.0.0.1 only: GCS on $DIFFGRM_RAY_PORT (6390), dashboard and
# Jobs API on http://127.0.0.1:$DIFFGRM_DASHBOARD_PORT (8265). Each node gets 1 CPU and
# a custom resource (node_head / node_worker) so tasks can be pinned to one node.
#
# Temp dirs: `ray start --temp-dir` may be given per node (Ray >= 2.x; `ray start --help`
# says "Can be specified per node"), so each node has its own session folder under
# $DIFFGRM_RAY_TMP (/tmp/diffgrm-ray-<uid>/{head,worker}) -- logs are not mixed, and the
# default /tmp/ray is untouched, so a plain `ray.init()` (the test suite, `diffgrm` without
# RAY_ADDRESS) never joins this cluster by accident. Two nodes on one host also need
# different dashboard-agent HTTP ports (default 52365 for both), so free ports are picked.
#
# Stopping: `ray stop [--force]` kills *every* Ray process of this user on the host,
# including Ray instances other jobs (e.g. a running test suite) started. `stop` therefore
# signals only the processes whose command line names this cluster's temp dir, plus their
# children (the ray::IDLE workers), SIGTERM first and SIGKILL after a grace period -- what
# `ray stop` and `ray stop --force` do, limited to these two nodes.
#
# Environment: RAY (ray binary, default .venv/bin/ray of this project), PYTHON (a Python
# with psutil, default the one beside $RAY), DIFFGRM_RAY_PORT, DIFFGRM_DASHBOARD_PORT,
# DIFFGRM_RAY_TMP, DIFFGRM_RAY_OBJECT_STORE_BYTES (per node, default 256 MiB).
set -euo pipefail

PROJECT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RAY="${RAY:-$PROJECT/.venv/bin/ray}"
PYTHON="${PYTHON:-$(dirname "$RAY")/python}"
PORT="${DIFFGRM_RAY_PORT:-6390}"
DASHBOARD_PORT="${DIFFGRM_DASHBOARD_PORT:-8265}"
TMP_ROOT="${DIFFGRM_RAY_TMP:-/tmp/diffgrm-ray-$(id -u)}"
OBJECT_STORE_BYTES="${DIFFGRM_RAY_OBJECT_STORE_BYTES:-268435456}"
STATE="$TMP_ROOT/cluster.env"

# Ray 2.60 turns token authentication on by default for new clusters (and `ray start
# --head` turns it on whenever ~/.ray/auth_token exists). This throwaway cluster is bound
# to loopback only, so it runs without auth; clients of it must not send a token either
# (JobSubmissionClient only does when RAY_AUTH_MODE=token). Never do this on a cluster
# reachable from a network: see cluster/README.md for token auth there.
export RAY_AUTH_MODE=disabled
export RAY_USAGE_STATS_ENABLED=0

die() { echo "local_cluster: $*" >&2; exit 1; }

[[ -x "$RAY" ]] || die "no ray binary at $RAY (make install, or set RAY=/path/to/ray)"
[[ -x "$PYTHON" ]] || die "no python at $PYTHON (set PYTHON=/path/to/python with psutil)"

port_is_free() {  # port_is_free PORT -> exit status 0 when 127.0.0.1:PORT can be bound
    "$PYTHON" - "$1" <<'EOF'
import socket, sys
with socket.socket() as s:
    try:
        s.bind(("127.0.0.1", int(sys.argv[1])))
    except OSError:
        sys.exit(1)
EOF
}

free_port() {  # a port the kernel hands out now; Ray binds it a moment later
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Our processes: command line mentions $TMP_ROOT/ (session/log dirs, --temp-dir), plus all
# their descendants. Prints "pid name" lines; with "kill" signals them (TERM, then KILL).
our_processes() {
    "$PYTHON" - "$TMP_ROOT" "${1:-list}" <<'EOF'
import os, sys, time
import psutil

root, action = sys.argv[1].rstrip("/") + "/", sys.argv[2]
me = os.getpid()
found = {}
for proc in psutil.process_iter(["pid", "name", "cmdline"]):
    try:
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.pid != me and root in cmd and "local_cluster.sh" not in cmd:
            found[proc.pid] = proc
            for child in proc.children(recursive=True):
                found[child.pid] = child
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        continue
procs = list(found.values())
if action == "kill" and procs:
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    time.sleep(0.5)
    procs = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
for p in procs:
    try:
        print(p.pid, p.name())
    except psutil.NoSuchProcess:
        continue
EOF
}

running() {  # our GCS is alive (captured first: `| grep -q` + pipefail = SIGPIPE failures)
    local procs
    [[ -f "$STATE" ]] || return 1
    procs=$(our_processes)
    [[ "$procs" == *gcs_server* ]]
}

wait_for_nodes() {  # wait_for_nodes N: until `ray status` lists N active nodes (60 s)
    local deadline=$((SECONDS + 60)) active=0
    while ((SECONDS < deadline)); do
        active=$("$RAY" status --address "127.0.0.1:$PORT" 2>/dev/null |
                 awk '/^Active:/{on=1; next} /^(Idle|Pending|Recent failures):/{on=0} on && /node_/' | wc -l || true)
        ((active >= $1)) && return 0
        sleep 2
    done
    return 1
}

print_usage_hint() {
    cat <<EOF
Ray cluster up: 2 nodes on 127.0.0.1 (logs under $TMP_ROOT/{head,worker}/session_latest/logs)
  dashboard / Jobs API:  http://127.0.0.1:$DASHBOARD_PORT
  GCS address:           127.0.0.1:$PORT
Submit a job:     RAY_AUTH_MODE=disabled ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- diffgrm ...
Run a stage on it: RAY_AUTH_MODE=disabled RAY_ADDRESS=127.0.0.1:$PORT diffgrm tokenize -c configs/tiny.yaml -o runs/tiny
Stop:             tools/local_cluster.sh stop
EOF
}

start() {
    if running; then
        # shellcheck disable=SC1090
        source "$STATE"
        echo "already running"
        print_usage_hint
        return 0
    fi
    if [[ -n "$(our_processes)" ]]; then
        die "leftover processes under $TMP_ROOT; run: $0 stop"
    fi
    port_is_free "$PORT" || die "port $PORT is in use; set DIFFGRM_RAY_PORT"
    port_is_free "$DASHBOARD_PORT" || die "port $DASHBOARD_PORT is in use; set DIFFGRM_DASHBOARD_PORT"
    mkdir -p "$TMP_ROOT/head" "$TMP_ROOT/worker"

    local head_agent worker_agent client_port
    head_agent=$(free_port); worker_agent=$(free_port); client_port=$(free_port)
    "$RAY" start --head \
        --node-ip-address=127.0.0.1 --port="$PORT" \
        --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        --dashboard-agent-listen-port="$head_agent" --ray-client-server-port="$client_port" \
        --num-cpus=1 --num-gpus=0 --resources='{"node_head": 1}' \
        --object-store-memory="$OBJECT_STORE_BYTES" \
        --temp-dir="$TMP_ROOT/head" --disable-usage-stats
    printf 'PORT=%s\nDASHBOARD_PORT=%s\n' "$PORT" "$DASHBOARD_PORT" > "$STATE"

    if ! "$RAY" start --address="127.0.0.1:$PORT" \
            --node-ip-address=127.0.0.1 \
            --dashboard-agent-listen-port="$worker_agent" \
            --num-cpus=1 --num-gpus=0 --resources='{"node_worker": 1}' \
            --object-store-memory="$OBJECT_STORE_BYTES" \
            --temp-dir="$TMP_ROOT/worker" --disable-usage-stats; then
        echo "local_cluster: worker node failed to start; stopping the head" >&2
        stop >&2 || true
        exit 1
    fi
    if ! wait_for_nodes 2; then
        echo "local_cluster: the cluster did not report 2 active nodes within 60 s" >&2
        stop >&2 || true
        exit 1
    fi
    print_usage_hint
}

stop() {
    local before left others
    before=$(our_processes | wc -l)
    our_processes kill > /dev/null
    rm -f "$STATE"
    left=$(our_processes)
    if [[ -n "$left" ]]; then
        echo "local_cluster: still running after SIGTERM and SIGKILL:" >&2
        echo "$left" >&2
        return 1
    fi
    echo "signalled $before process(es)"
    echo "stopped: no raylet/gcs_server (or other process) of $TMP_ROOT is left"
    others=$(ps -u "$(id -u)" -o comm= | grep -cxE 'raylet|gcs_server' || true)
    if ((others > 0)); then
        echo "note: $others raylet/gcs_server process(es) of other Ray instances run on this host; left alone"
    fi
}

status() {
    if ! running; then
        echo "not running (no gcs_server under $TMP_ROOT)"
        return 1
    fi
    # shellcheck disable=SC1090
    source "$STATE"
    "$RAY" status --address "127.0.0.1:$PORT"
    echo "dashboard: http://127.0.0.1:$DASHBOARD_PORT"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
