//! Executes every kernel under the CPU emulation of the CUDA thread model (`emu/emu.hpp`,
//! compiled by the machine's C++ compiler) against plain reference loops: the kernels' logic,
//! indexing, synchronisation and mma fragment layout are checked on every CI run, without a GPU.

use std::path::{Path, PathBuf};
use std::process::Command;

fn build_checker() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kernel-emulation-check");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let status = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O2",
            "-pthread",
            "-Wall",
            "-Wextra",
            "-Werror",
        ])
        .args(["-Wno-unused-parameter", "-Wno-unknown-pragmas"])
        .arg(dir.join("emu/check.cpp"))
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {cxx:?} (set CXX): {e}"));
    assert!(
        status.success(),
        "the kernel emulation check did not compile"
    );
    out
}

fn run(checker: &Path, group: &str) {
    let out = Command::new(checker)
        .arg(group)
        .output()
        .expect("run the kernel emulation check");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "kernel checks failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("all kernel checks passed"));
}

#[test]
fn kernels_match_their_reference_loops_under_emulation() {
    let checker = build_checker();
    for group in ["elementwise", "kv", "attention"] {
        run(&checker, group);
    }
}
