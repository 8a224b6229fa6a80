//! Replays every fuzz target's corpus (`fuzz/corpus/<target>/`, the seeds and every crash ever
//! found) through the target's checks (`fuzz/src/lib.rs`, included here), so CI catches a
//! parser regression without nightly or building the libFuzzer targets. Run the fuzzer itself
//! with `scripts/fuzz.sh`.

#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod checks;

use std::path::PathBuf;

#[test]
fn every_corpus_input_passes_its_targets_checks() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for target in checks::TARGETS {
        let dir = root.join(target);
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "corpus of {target} is empty");
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            let run = std::panic::catch_unwind(|| checks::check(target, &data));
            assert!(
                run.is_ok(),
                "{target}: {} fails its checks",
                input.display()
            );
        }
    }
}
