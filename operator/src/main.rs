//! petrel-operator (placeholder until the operator issue lands).
fn main() {}
