#!/usr/bin/env bash
# Runs every test of the workspace: installs the pinned nats-server (scripts/setup.sh), which the
# integration tests start on random ports, then `cargo test --workspace`.
#
#   ./scripts/test.sh                       # everything
#   ./scripts/test.sh -p chat-cli           # extra arguments go to cargo test
#   ./scripts/test.sh -- --nocapture        # ... and after `--` to the test binaries
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_DIR="$(cd -- "${SCRIPT_DIR}/.." && pwd -P)"
cd "${REPO_DIR}"

command -v cargo >/dev/null 2>&1 || {
    echo "test.sh: error: cargo not found; install the Rust toolchain (https://rustup.rs)" >&2
    exit 1
}
"${SCRIPT_DIR}/setup.sh"

# The fault-injection suite (e2e/tests/faults.rs) and the bench smoke tests (bench/tests/smoke.rs)
# run the service binaries as processes.
echo "test.sh: cargo build --workspace --bins" >&2
cargo build --workspace --bins
summaries="${CARGO_TARGET_DIR:-target}/fault-summaries.txt"
rm -f "${summaries}"
echo "test.sh: cargo test --workspace $*" >&2
status=0
cargo test --workspace "$@" || status=$?
if [[ -f "${summaries}" ]]; then
    echo "test.sh: fault-injection summaries:" >&2
    cat "${summaries}"
fi
exit "${status}"
