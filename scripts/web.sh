#!/usr/bin/env bash
# The web client (web/): its node packages, its build and its tests. Called by dev.sh and test.sh.
#
#   scripts/web.sh setup     node packages from web/package-lock.json (npm ci, only when the
#                            lockfile changed since the last install); `setup chromium`: and
#                            Debian's chromium if missing (apt-get), for the browser test
#   scripts/web.sh build     setup, then build the library and the app into web/*/dist (only when
#                            a source is newer than the last build)
#   scripts/web.sh test      setup, Debian's chromium if missing (apt-get), the library's unit
#                            tests (Vitest), the build, then the browser test (web/e2e/), which
#                            starts its own backend with scripts/dev.sh on free ports and a
#                            temporary state dir; screenshots go to target/web-e2e/
#   scripts/web.sh e2e       only the browser test (expects the Rust binaries and the app built)
#
# Needs Node.js 20.19 or newer with npm. The built assets and node_modules are never committed.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_DIR="$(cd -- "${SCRIPT_DIR}/.." && pwd -P)"
WEB_DIR="${REPO_DIR}/web"
NODE_MIN_MAJOR=20
NODE_MIN_MINOR=19

log() { echo "web.sh: $*" >&2; }
die() {
    echo "web.sh: error: $*" >&2
    exit 1
}

check_node() {
    command -v node >/dev/null 2>&1 || die "node not found; install Node.js ${NODE_MIN_MAJOR}.${NODE_MIN_MINOR} or newer (with npm)"
    command -v npm >/dev/null 2>&1 || die "npm not found; install npm beside node"
    local v major minor
    v="$(node --version)"
    IFS=. read -r major minor _ <<<"${v#v}"
    if ((major < NODE_MIN_MAJOR || (major == NODE_MIN_MAJOR && minor < NODE_MIN_MINOR))); then
        die "node ${v} is too old; need ${NODE_MIN_MAJOR}.${NODE_MIN_MINOR} or newer"
    fi
}

setup() {
    check_node
    local stamp="${WEB_DIR}/node_modules/.chat-lock.sha256" want
    want="$(sha256sum "${WEB_DIR}/package-lock.json" | cut -d' ' -f1)"
    if [[ -f "${stamp}" && "$(cat "${stamp}")" == "${want}" ]]; then
        return
    fi
    log "npm ci (web/package-lock.json)"
    (cd "${WEB_DIR}" && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci failed"
    echo "${want}" >"${stamp}"
}

# Installs Debian's chromium for the browser test, unless it is there.
setup_chromium() {
    [[ -x /usr/bin/chromium ]] && return
    local sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "/usr/bin/chromium is missing; install Debian's chromium package (needs root)"
        sudo=(sudo -n)
    fi
    command -v apt-get >/dev/null 2>&1 || die "/usr/bin/chromium is missing and there is no apt-get; install Chromium at /usr/bin/chromium"
    log "installing chromium (apt-get)"
    "${sudo[@]}" apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null \
        || die "apt-get install chromium failed"
    [[ -x /usr/bin/chromium ]] || die "chromium installed, but /usr/bin/chromium is missing"
}

build() {
    setup
    local stamp="${WEB_DIR}/app/dist/index.html"
    if [[ -f "${stamp}" ]] && [[ -z "$(find "${WEB_DIR}/client/src" "${WEB_DIR}/app/src" "${WEB_DIR}/app/index.html" \
        "${WEB_DIR}/app/vite.config.ts" "${WEB_DIR}/package-lock.json" -newer "${stamp}" -print -quit)" ]]; then
        return
    fi
    log "building the web client (web/client, web/app)"
    (cd "${WEB_DIR}" && npm run --silent build) || die "the web build failed"
}

e2e() {
    check_node
    setup_chromium
    log "browser test (web/e2e; screenshots in target/web-e2e/)"
    (cd "${WEB_DIR}" && node --test --test-concurrency=1 e2e/chat.test.mjs)
}

case "${1:-}" in
    setup)
        setup
        if [[ "${2:-}" == chromium ]]; then setup_chromium; fi
        ;;
    build) build ;;
    test)
        setup
        setup_chromium
        log "unit tests (web/client, Vitest)"
        (cd "${WEB_DIR}" && npm test --silent)
        build
        e2e
        ;;
    e2e) e2e ;;
    *)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
