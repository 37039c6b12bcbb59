//! `crdgen`: writes the CRD YAML generated from the Rust types to `manifests/crds/` (plain
//! manifests) and `charts/petrel/crds/` (the Helm chart's CRDs, same content).
//!
//! Usage: `cargo run -p crds --bin crdgen [OUT_DIR...]` (default: both folders above,
//! relative to the workspace root). The `crds` test suite fails when the committed files in
//! either folder differ.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The folders written when no OUT_DIR is given, relative to the workspace root.
const DEFAULT_DIRS: [&str; 2] = ["manifests/crds", "charts/petrel/crds"];

fn main() -> ExitCode {
    let mut outs: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if outs.is_empty() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        outs = DEFAULT_DIRS.iter().map(|dir| root.join(dir)).collect();
    }
    for out in &outs {
        if let Err(message) = write_all(out) {
            eprintln!("crdgen: {message}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// Writes every CRD into `out`, creating the folder when needed.
fn write_all(out: &Path) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    for (file, crd) in crds::all() {
        let path = out.join(file);
        let yaml = crds::to_yaml(&crd).map_err(|e| format!("cannot serialise {file}: {e}"))?;
        std::fs::write(&path, yaml).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
