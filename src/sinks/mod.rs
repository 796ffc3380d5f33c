//! Sinks: what each flow action writes for a validated payload, inside the batch's transaction.
//! One file per action, so adding an action is adding a file and a match arm in `batch`.
//!
//! Each sink has two halves: rendering (pure, done once per message before any database work,
//! so that a payload that can never be written fails alone and early) and writing rows for a
//! whole batch in the caller's transaction.

pub mod post_endpoint;
pub mod store_db;
