//! Test fixtures (filled in with the reconcile tests).
