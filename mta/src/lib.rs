//! petrel-mta: the Petrel SMTP server, as a library the binary and the tests share.
//!
//! Modules in the order mail flows through them:
//! [`listener`] accepts connections → [`session`] speaks SMTP → [`policy`] decides about
//! each recipient → [`cleanup`] adds trace headers and is the only writer of the
//! [`spool`] → [`scheduler`] picks queued messages → [`local`] delivers them into Maildirs.
//! [`context`] holds what every stage shares; [`shutdown`] stops them in order.

pub mod cleanup;
pub mod context;
pub mod listener;
pub mod local;
pub mod policy;
pub mod queue;
pub mod scheduler;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod spool;
