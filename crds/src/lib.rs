//! Petrel custom resource types (placeholder until the operator issue lands).
