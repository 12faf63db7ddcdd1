//! Replays the fuzz corpora (`fuzz/corpus/`) through the same checks the
//! fuzz targets run, so every input the fuzzer found interesting stays a
//! regression test on the stable toolchain. Fuzzing itself: fuzz/README.md.

#[allow(dead_code)]
#[path = "../../fuzz/checks.rs"]
mod checks;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "corpus input {} fails the {target} checks",
            path.display()
        );
        n += 1;
    }
    assert!(n >= 4, "the {target} corpus has only {n} inputs");
}

#[test]
fn message_corpus() {
    replay("message", checks::message);
}

#[test]
fn wire_corpus() {
    replay("wire", checks::wire);
}
