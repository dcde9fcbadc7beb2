//! The checked-in generated code must be exactly what `proto/` produces.
//!
//! `KILN_UPDATE_GENERATED=1 cargo test -p kiln-proto --test generated_code` (what
//! `make proto` runs) rewrites `src/generated/` instead of comparing.

use std::fs;
use std::path::{Path, PathBuf};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs protoc (vendored) and tonic-prost-build into `out`.
fn generate(out: &Path) {
    let proto_root = crate_dir().join("../../proto");
    let files: Vec<PathBuf> = kiln_proto::PROTO_FILES
        .iter()
        .map(|f| proto_root.join(f))
        .collect();
    let includes = vec![
        proto_root.clone(),
        protoc_bin_vendored::include_path().expect("vendored protoc include path"),
    ];
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path().expect("vendored protoc"));
    // Output chunks and file contents are passed along without copies.
    config.bytes(["."]);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .out_dir(out)
        .file_descriptor_set_path(out.join("kiln_descriptor.bin"))
        .compile_with_config(config, &files, &includes)
        .expect("protoc and code generation succeed");
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("readable dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn generated_code_matches_the_proto_files() {
    let fresh = tempfile::tempdir().expect("tempdir");
    generate(fresh.path());
    let checked_in = crate_dir().join("src/generated");

    if std::env::var_os("KILN_UPDATE_GENERATED").is_some() {
        if checked_in.exists() {
            fs::remove_dir_all(&checked_in).expect("clear src/generated");
        }
        fs::create_dir_all(&checked_in).expect("create src/generated");
        for name in listing(fresh.path()) {
            fs::copy(fresh.path().join(&name), checked_in.join(&name)).expect("copy");
        }
        eprintln!("rewrote {}", checked_in.display());
        return;
    }

    assert_eq!(
        listing(fresh.path()),
        listing(&checked_in),
        "the set of generated files differs; run `make proto`"
    );
    let stale: Vec<String> = listing(fresh.path())
        .into_iter()
        .filter(|name| {
            fs::read(fresh.path().join(name)).ok() != fs::read(checked_in.join(name)).ok()
        })
        .collect();
    assert!(
        stale.is_empty(),
        "generated code is out of date in {stale:?}; run `make proto`"
    );
}
