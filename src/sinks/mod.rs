//! Sinks: what each flow action does with a validated payload. One file per action, so adding
//! an action is adding a file and a match arm in the processor.

pub mod post_endpoint;
pub mod store_db;

pub use post_endpoint::PostEndpoint;
pub use store_db::StoreDb;

use crate::db::CounterError;

/// Why a sink did not take a message for a flow.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The message can never be written as it is (a value too long for its column, ...).
    #[error("{0}")]
    Rejected(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Counter(#[from] CounterError),
}
