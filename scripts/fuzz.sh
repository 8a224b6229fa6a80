#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ (cargo-fuzz, libFuzzer) for a while each, starting from the
# seed corpus in fuzz/corpus/<target>/. Installs cargo-fuzz if missing; needs the nightly
# toolchain (`rustup toolchain install nightly`).
#
#   ./scripts/fuzz.sh                 # every target, 30 s each
#   ./scripts/fuzz.sh 300             # every target, 300 s each
#   ./scripts/fuzz.sh 60 token ids    # only these targets
#
# New inputs a run finds go to fuzz/corpus-work/<target>/ (not committed); crashes go to
# fuzz/artifacts/<target>/ and make the script fail. A crash becomes a regression test by
# copying its input into fuzz/corpus/<target>/ (replayed by `cargo test -p chat-sequencer
# --test fuzz_corpus`, which scripts/test.sh runs) and fixing the parser.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
FUZZ_DIR="$(cd -- "${SCRIPT_DIR}/../fuzz" && pwd -P)"
cd "${FUZZ_DIR}"

seconds="${1:-30}"
shift || true
targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^chat-fuzz$')
fi

rustup toolchain list | grep -q '^nightly' || {
    echo "fuzz.sh: error: the nightly toolchain is missing: rustup toolchain install nightly" >&2
    exit 1
}
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

echo "fuzz.sh: building the fuzz targets" >&2
cargo +nightly fuzz build

status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus-work/${t}" "corpus/${t}"
    echo "fuzz.sh: ${t} for ${seconds}s" >&2
    log="corpus-work/${t}.log"
    if cargo +nightly fuzz run "${t}" "corpus-work/${t}" "corpus/${t}" -- \
        -max_total_time="${seconds}" -max_len=4096 -print_final_stats=1 >"${log}" 2>&1; then
        result=ok
    else
        result=CRASH
        status=1
    fi
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "${log}" | tail -n1)"
    cov="$(grep -oE 'cov: [0-9]+' "${log}" | tail -n1 | cut -d' ' -f2)"
    echo "fuzz.sh: ${t}: ${result} executions=${execs:-?} coverage=${cov:-?} (log ${FUZZ_DIR}/${log})"
done
exit "${status}"
