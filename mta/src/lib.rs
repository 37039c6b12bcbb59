//! petrel-mta: the Petrel SMTP server, as a library the binary and the tests share.
//!
//! Modules in the order mail flows through them:
//! [`listener`] accepts connections (after a [`proxy`] header where configured) →
//! [`session`] speaks SMTP → [`policy`] decides about each recipient → [`cleanup`] adds
//! trace headers and is the only writer of the [`spool`] → [`queue`]'s scheduler decides
//! when each message is attempted → [`delivery`] sends it (SMTP/LMTP, or [`local`]
//! Maildirs) → [`dsn`] tells the sender about failures and delays. [`drain`] empties the
//! queue into peers before a scale-in (and stores what a draining peer hands over,
//! through [`cleanup`]). [`admin`] serves `petrel-mta queue`; [`context`] holds what every
//! stage shares; [`shutdown`] stops them in order.

pub mod admin;
pub mod admission;
pub mod auth_guard;
pub mod checks;
pub mod cleanup;
pub mod context;
pub mod dates;
pub mod delivery;
pub mod dense_map;
pub mod drain;
pub mod dsn;
pub mod files;
pub mod fleet_limits;
pub mod limits;
pub mod listener;
pub mod local;
pub mod memory;
pub mod policy;
pub mod pressure;
pub mod proxy;
pub mod qmgr;
pub mod queue;
pub mod recovery;
pub mod reload;
pub mod reply;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod signing;
pub mod spool;
pub mod stream;
pub mod tls;
pub mod users;
