//! `crdgen`: writes the CRD YAML generated from the Rust types to `manifests/crds/`.
//!
//! Usage: `cargo run -p crds --bin crdgen [OUT_DIR]` (default: `manifests/crds` relative to
//! the workspace root). The `crds` test suite fails when the committed files differ.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let out = std::env::args_os().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds"),
        PathBuf::from,
    );
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("crdgen: cannot create {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    for (file, crd) in crds::all() {
        let path = out.join(file);
        let yaml = match crds::to_yaml(&crd) {
            Ok(yaml) => yaml,
            Err(e) => {
                eprintln!("crdgen: cannot serialise {file}: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = std::fs::write(&path, yaml) {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
