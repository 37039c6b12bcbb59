//! Reading Petrel resources from YAML files for the offline commands (`render`, `dns`).
//!
//! Accepts files and directories (every `*.yaml`/`*.yml` inside, sorted by name), each
//! holding one or more YAML documents. A document of `kind: List` (what `kubectl get -o
//! yaml` prints) stands for its `items`. Documents are sorted into a [`World`] by `kind`;
//! Secrets are kept as observed facts; anything else is refused so a typo in `kind` is
//! not silently ignored.

use crate::render::World;
use std::path::{Path, PathBuf};

/// Why a file could not be turned into resources.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not YAML.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A document of a kind this tool does not read.
    #[error(
        "{path}: {at} has unsupported kind {kind:?} (expected MailDomain, SmtpListener, RelayPolicy, DkimKey, Secret or a List of them)"
    )]
    UnknownKind {
        /// The file.
        path: PathBuf,
        /// Which document (zero-based), and which item of a List: `document 0, item 3`.
        at: String,
        /// The kind found.
        kind: String,
    },
    /// A document of a known kind does not match its schema.
    #[error("{path}: {at} ({kind}): {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Which document (zero-based), and which item of a List: `document 0, item 3`.
        at: String,
        /// The kind.
        kind: String,
        /// What is wrong.
        message: String,
    },
}

/// Loads every resource in `paths` (files or directories). Resources without a namespace
/// get `default_namespace`.
pub fn load(paths: &[PathBuf], default_namespace: &str) -> Result<World, InputError> {
    let mut world = World::default();
    for path in paths {
        for file in yaml_files(path)? {
            let text = std::fs::read_to_string(&file).map_err(|source| InputError::Read {
                path: file.clone(),
                source,
            })?;
            add_documents(&mut world, &file, &text, default_namespace)?;
        }
    }
    world.sort();
    Ok(world)
}

fn yaml_files(path: &Path) -> Result<Vec<PathBuf>, InputError> {
    let read_err = |source| InputError::Read {
        path: path.to_owned(),
        source,
    };
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(read_err)? {
        let file = entry.map_err(read_err)?.path();
        if matches!(
            file.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

/// Parses the YAML documents in `text` into `world`.
pub fn add_documents(
    world: &mut World,
    path: &Path,
    text: &str,
    default_namespace: &str,
) -> Result<(), InputError> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| InputError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    for (index, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let at = format!("document {index}");
        if doc["kind"] == "List" {
            let items = match doc.get("items") {
                Some(serde_json::Value::Array(items)) => items.clone(),
                None | Some(serde_json::Value::Null) => Vec::new(),
                Some(_) => {
                    return Err(InputError::Invalid {
                        path: path.to_owned(),
                        at,
                        kind: "List".to_owned(),
                        message: "items is not a list".to_owned(),
                    });
                }
            };
            for (item, doc) in items.into_iter().enumerate() {
                add_document(
                    world,
                    path,
                    format!("{at}, item {item}"),
                    doc,
                    default_namespace,
                )?;
            }
        } else {
            add_document(world, path, at, doc, default_namespace)?;
        }
    }
    Ok(())
}

/// Adds one resource to `world`; `at` says where it is in its file.
fn add_document(
    world: &mut World,
    path: &Path,
    at: String,
    mut doc: serde_json::Value,
    default_namespace: &str,
) -> Result<(), InputError> {
    if doc["metadata"]["namespace"].is_null() {
        doc["metadata"]["namespace"] = default_namespace.into();
    }
    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
    let invalid = |e: serde_json::Error| InputError::Invalid {
        path: path.to_owned(),
        at: at.clone(),
        kind: kind.clone(),
        message: e.to_string(),
    };
    match kind.as_str() {
        "MailDomain" => world
            .domains
            .push(serde_json::from_value(doc).map_err(invalid)?),
        "SmtpListener" => world
            .listeners
            .push(serde_json::from_value(doc).map_err(invalid)?),
        "RelayPolicy" => world
            .relay_policies
            .push(serde_json::from_value(doc).map_err(invalid)?),
        "DkimKey" => world
            .dkim_keys
            .push(serde_json::from_value(doc).map_err(invalid)?),
        "Secret" => world
            .secrets
            .push(serde_json::from_value(doc).map_err(invalid)?),
        _ => {
            return Err(InputError::UnknownKind {
                path: path.to_owned(),
                at,
                kind,
            });
        }
    }
    Ok(())
}
