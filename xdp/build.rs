//! Compiles the BPF programs in bpf/ with clang (docs/design.md: Debian's clang 14, matching its llc 14).
use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let clang = env::var("STROM_CLANG").unwrap_or_else(|_| "clang".into());
    for (src, obj) in [
        ("bpf/strom.c", "strom.bpf.o"),
        ("bpf/socklb.c", "socklb.bpf.o"),
    ] {
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(obj);
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg("-I/usr/include/x86_64-linux-gnu")
            .args(["-c", src, "-o"])
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {clang} to build {src}: {e} (apt-get install clang libbpf-dev)")
            });
        assert!(
            status.success(),
            "{clang} failed to build {src} (needs clang and libbpf-dev)"
        );
    }
}
