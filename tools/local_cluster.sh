#!/usr/bin/env bash
# A real two-node Ray cluster on this machine, for trying `diffgrm submit` and the
# multi-node code paths without a cloud account:
#
#   tools/local_cluster.sh start    # head (node_head) + one worker node (node_worker)
#   tools/local_cluster.sh status   # `ray status` of that cluster
#   tools/local_cluster.sh stop     # stops exactly those two nodes, checks nothing is left
#
# The nodes share this host's disk but not a run folder: give `diffgrm submit` an s3://
# (or other URI) run directory and each node pulls what it reads into its own mirror,
# $DIFFGRM_RAY_TMP/{head,worker}/cache, as separate machines would.
#
# Each node gets 1 CPU and a custom resource (node_head / node_worker) so that tasks can
# be pinned to one node. The dashboard and Jobs API listen on http://127.0.0.1:8265 only
# ($DIFFGRM_DASHBOARD_PORT), the GCS on port 6390 ($DIFFGRM_RAY_PORT).
#
# What Ray 2.60 does with "loopback only" (checked with `ss -ltnp`):
#  - `ray start --node-ip-address=127.0.0.1` is rewritten to the host's primary IP
#    (ray._private.services.resolve_ip_for_localhost) whenever multi-node clusters are
#    enabled, which on Linux they always are; the GCS, raylets and object managers then
#    listen on all interfaces (*:PORT), whatever --node-ip-address says.
#  - Only a head in single-host mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) binds the GCS
#    to 127.0.0.1 -- but then no second node can join: `ray start --address` refuses to
#    start in that mode, and with it enabled it rewrites 127.0.0.1:PORT to HOST_IP:PORT,
#    where that GCS does not listen.
#  - Other loopback addresses (--node-ip-address=127.0.0.2) are kept as node addresses,
#    but the gRPC servers still bind to all interfaces, and drivers on this host would
#    default to the host IP, which then matches no raylet (not pursued further).
#  So the nodes are started the ordinary way; only the dashboard/Jobs API (the part that
#  runs arbitrary commands over HTTP) is bound to 127.0.0.1. The gRPC ports are reachable
#  from the network: use DIFFGRM_RAY_AUTH=token on a host that others can reach.
#
# Temp dirs: `ray start --temp-dir` may be given per node ("Can be specified per node",
# `ray start --help`), so each node has its own session folder under $DIFFGRM_RAY_TMP
# (/tmp/diffgrm-ray-<uid>/{head,worker}): logs are not mixed, and the default /tmp/ray is
# untouched, so a plain `ray.init()` (the test suite, `diffgrm` without RAY_ADDRESS) never
# joins this cluster by accident. Two nodes on one host also need different dashboard-agent
# HTTP ports (both default to 52365), so free ports are picked for them.
#
# Stopping: `ray stop [--force]` kills *every* Ray process of this user on the host,
# including Ray instances that other jobs (e.g. a running test suite) started. `stop`
# therefore signals only the processes whose command line names this cluster's temp dir,
# plus their children (the ray::IDLE workers): SIGTERM first and SIGKILL after 15 s -- what
# `ray stop` and `ray stop --force` do, limited to these two nodes.
#
# Environment: RAY (ray binary, default .venv/bin/ray of this project), PYTHON (a Python
# with psutil, default the one beside $RAY), DIFFGRM_RAY_PORT, DIFFGRM_DASHBOARD_PORT,
# DIFFGRM_RAY_TMP, DIFFGRM_RAY_OBJECT_STORE_BYTES (per node, default 256 MiB),
# DIFFGRM_RAY_AUTH (disabled | token, default disabled).
set -euo pipefail
# A driver in this shell may have set single-host mode (raycluster.ray_session does); two nodes need it off.
unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER

PROJECT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RAY="${RAY:-$PROJECT/.venv/bin/ray}"
PYTHON="${PYTHON:-$(dirname "$RAY")/python}"
PORT="${DIFFGRM_RAY_PORT:-6390}"
DASHBOARD_PORT="${DIFFGRM_DASHBOARD_PORT:-8265}"
TMP_ROOT="${DIFFGRM_RAY_TMP:-/tmp/diffgrm-ray-$(id -u)}"
OBJECT_STORE_BYTES="${DIFFGRM_RAY_OBJECT_STORE_BYTES:-268435456}"
STATE="$TMP_ROOT/cluster.env"

AUTH="${DIFFGRM_RAY_AUTH:-disabled}"
if [[ -z "${DIFFGRM_RAY_AUTH:-}" && -f "$STATE" ]]; then  # status/stop: as it was started
    AUTH="$(sed -n 's/^AUTH=//p' "$STATE")"
fi
TOKEN_FILE="$TMP_ROOT/auth_token"

# Ray 2.60 turns token authentication on by default for clusters that ray.init() starts,
# and `ray start --head` turns it on whenever ~/.ray/auth_token exists. This throwaway test
# cluster runs without it by default (RAY_AUTH_MODE=disabled, for this script's processes
# only), so local clients need no token: JobSubmissionClient and `ray job submit` send one
# only when RAY_AUTH_MODE=token. DIFFGRM_RAY_AUTH=token instead generates a throwaway token
# in $TMP_ROOT/auth_token (mode 0600, never printed) and starts both nodes with it; clients
# then need RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TMP_ROOT/auth_token. Real clusters:
# see cluster/README.md.
case "$AUTH" in
    disabled) export RAY_AUTH_MODE=disabled; unset RAY_AUTH_TOKEN RAY_AUTH_TOKEN_PATH ;;
    token) export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE"; unset RAY_AUTH_TOKEN ;;
    *) echo "local_cluster: DIFFGRM_RAY_AUTH must be disabled or token, not $AUTH" >&2; exit 2 ;;
esac
export RAY_USAGE_STATS_ENABLED=0
# The nodes' PATH starts with the virtualenv's bin, so job entrypoints such as
# `diffgrm pipeline ...` find the project's console script without activating anything.
PATH="$(cd "$(dirname "$RAY")" && pwd):$PATH"
export PATH

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
for proc in psutil.process_iter(["pid", "name", "cmdline", "uids"]):
    try:
        cmd = " ".join(proc.info["cmdline"] or [])
        mine = proc.info["uids"] is not None and proc.info["uids"].real == os.getuid()
        if mine and proc.pid != me and root in cmd and "local_cluster.sh" not in cmd:
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
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(alive, timeout=5)
    time.sleep(0.5)
    def alive_now(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    procs = [p for p in procs if alive_now(p)]
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
    local client_env="RAY_AUTH_MODE=disabled"
    [[ "$AUTH" == token ]] && client_env="RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN_FILE"
    cat <<EOF
Ray cluster up: 2 nodes (node_head, node_worker), 1 CPU each, auth $AUTH
  dashboard / Jobs API:  http://127.0.0.1:$DASHBOARD_PORT
  GCS address:           127.0.0.1:$PORT
  logs:                  $TMP_ROOT/{head,worker}/session_latest/logs
Submit a job:      $client_env ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- diffgrm ...
Run a stage on it: $client_env RAY_ADDRESS=127.0.0.1:$PORT diffgrm tokenize -c configs/tiny.yaml -o runs/tiny
Stop:              tools/local_cluster.sh stop
EOF
}

start_node() {  # start_node NAME [ray start args...]: one node of this cluster, or clean up and exit
    local name=$1 log="$TMP_ROOT/start-$1.log"
    shift
    echo "starting $name node (log: $log)"
    # `ray start` output goes to the log, shown only on failure; `timeout`: a node that
    # cannot reach the GCS retries for minutes instead of failing. 1 CPU and a custom
    # resource (node_NAME) per node; its own temp dir and dashboard-agent port.
    # --node-ip-address=127.0.0.1: Ray maps it to the host IP (see the top of this file).
    # DIFFGRM_CACHE_DIR: each node keeps its own mirror of remote (s3://...) run
    # directories, as separate machines would; processes inherit it from their raylet.
    if ! DIFFGRM_CACHE_DIR="$TMP_ROOT/$name/cache" timeout 120 "$RAY" start "$@" \
            --node-ip-address=127.0.0.1 --dashboard-agent-listen-port="$(free_port)" \
            --num-cpus=1 --num-gpus=0 --resources="{\"node_$name\": 1}" \
            --object-store-memory="$OBJECT_STORE_BYTES" \
            --temp-dir="$TMP_ROOT/$name" --disable-usage-stats > "$log" 2>&1; then
        cat "$log" >&2
        echo "local_cluster: the $name node failed to start; cleaning up" >&2
        stop >&2 || true
        exit 1
    fi
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
    if [[ "$AUTH" == token ]]; then
        (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$TOKEN_FILE")
    fi

    local client_port
    client_port=$(free_port)
    start_node head --head --port="$PORT" \
        --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        --ray-client-server-port="$client_port"
    printf 'PORT=%s\nDASHBOARD_PORT=%s\nAUTH=%s\n' "$PORT" "$DASHBOARD_PORT" "$AUTH" > "$STATE"
    start_node worker --address="127.0.0.1:$PORT"
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
    rm -f "$STATE" "$TOKEN_FILE"
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
