#!/usr/bin/env bash
# Runs every test of the workspace: installs the pinned nats-server, SeaweedFS and schemathesis
# (scripts/setup.sh), which the integration tests start on random ports, then `cargo test`, then
# the web client's tests (scripts/web.sh test: the TypeScript library's unit tests and the
# browser test in headless Chromium, whose screenshots go to target/web-e2e/).
#
#   ./scripts/test.sh                       # everything
#   ./scripts/test.sh -p chat-cli           # extra arguments go to cargo test (a package named:
#                                           # only its tests, no web tests)
#   ./scripts/test.sh -- --nocapture        # ... and after `--` to the test binaries
#   SKIP_WEB=1 ./scripts/test.sh            # without the web tests (scripts/web.sh test: only them)
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_DIR="$(cd -- "${SCRIPT_DIR}/.." && pwd -P)"
cd "${REPO_DIR}"

command -v cargo >/dev/null 2>&1 || {
    echo "test.sh: error: cargo not found; install the Rust toolchain (https://rustup.rs)" >&2
    exit 1
}
SETUP_SEAWEEDFS=1 SETUP_SCHEMATHESIS=1 SETUP_HELM=1 "${SCRIPT_DIR}/setup.sh"
skip_web="${SKIP_WEB:-0}"

# The fault-injection suite (e2e/tests/faults.rs) and the bench smoke tests (bench/tests/smoke.rs)
# run the service binaries as processes.
echo "test.sh: cargo build --workspace --bins" >&2
cargo build --workspace --bins
summaries="${CARGO_TARGET_DIR:-target}/fault-summaries.txt"
# Tests that need a server this machine lacks (the Cassandra store's, without
# CHAT_TEST_CASSANDRA: store/build.rs) are compiled #[ignore]d; the harness prints each as
# `test <name> ... ignored, <reason>`, and the lines are collected here for the summary.
skipped="${CARGO_TARGET_DIR:-target}/skipped-tests.txt"
rm -f "${summaries}" "${skipped}"
# `cargo test --workspace -p X` tests the whole workspace: with a package named, test only it.
scope=(--workspace)
for arg in "$@"; do
    case "${arg}" in
        --) break ;;
        -p | --package | -p?* | --package=*) scope=() skip_web=1 ;;
    esac
done
if [[ "${skip_web}" != "1" ]]; then
    # Node packages and Chromium now, so that a missing install fails before the long part.
    "${SCRIPT_DIR}/web.sh" setup chromium
fi
status=0
# The Helm chart: linted and rendered by Helm's engine, the manifests checked (a few seconds).
# Only in whole-workspace runs, like the cargo tests of every package.
if [[ ${#scope[@]} -gt 0 ]]; then
    echo "test.sh: chart tests (charts/tests, Helm engine from .venv)" >&2
    "${REPO_DIR}/.venv/bin/python" -m unittest discover -s charts/tests -v || status=$?
fi
echo "test.sh: cargo test ${scope[*]} $*" >&2
# stdout (the harness's per-test lines) is copied to find the ignored ones; with pipefail the
# status is cargo's.
test_log="${CARGO_TARGET_DIR:-target}/test-output.txt"
cargo test "${scope[@]}" "$@" | tee "${test_log}" || status=$?
grep -E '^test .* \.\.\. ignored' "${test_log}" >"${skipped}" || true
if [[ -f "${summaries}" ]]; then
    echo "test.sh: fault-injection summaries:" >&2
    cat "${summaries}"
fi
if [[ "${skip_web}" != "1" ]]; then
    echo "test.sh: scripts/web.sh test" >&2
    web_status=0
    "${SCRIPT_DIR}/web.sh" test || web_status=$?
    ((status != 0)) || status="${web_status}"
fi
if [[ -s "${skipped}" ]]; then
    echo "test.sh: $(wc -l <"${skipped}") tests SKIPPED (ignored: not run, not passed):" >&2
    cat "${skipped}"
else
    echo "test.sh: no tests skipped" >&2
fi
exit "${status}"
