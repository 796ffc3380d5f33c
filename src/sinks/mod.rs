//! Sinks: what each flow action makes of a validated payload, and the rows it writes for it
//! inside the batch's transaction. One file per action; the processor and the commit never
//! match on actions or their effects.
//!
//! Each sink file has three parts: `render` (pure, done once per message before any database
//! work, so that a payload that can never be written fails alone and early), an effect type
//! that answers [`Rendered`], and `write`, which picks its own effects out of the committed
//! items and inserts their rows in the caller's transaction.
//!
//! Adding an action: its name in [`crate::flows::Action`] (with how a row spells it), a new
//! file here, and in this file its `mod` line and one line in each of [`Effect`], [`render`],
//! `Effect::rendered` and [`Rows::write`]. The compiler asks for the arms in `render` and
//! `rendered`; the commit and the processor are not touched.

pub mod post_endpoint;
pub mod store_db;

use crate::db::StatementBounds;
use crate::flows::{Action, Flow};
use chrono::NaiveDateTime;
use serde_json::{Map, Value};
use sqlx::{MySql, Transaction};
use std::sync::Arc;

/// What one flow writes for one message, as its action rendered it.
pub enum Effect {
    StoreDb(store_db::Attributes),
    PostEndpoint(post_endpoint::Request),
}

/// Renders a validated payload for a flow, or says why this flow cannot take it.
pub fn render(flow: &Flow, payload: &Map<String, Value>) -> Result<Effect, String> {
    Ok(match &flow.action {
        Action::StoreDb => Effect::StoreDb(store_db::render(payload)?),
        Action::PostEndpoint { .. } => Effect::PostEndpoint(post_endpoint::render(payload)),
    })
}

impl Effect {
    fn rendered(&self) -> &dyn Rendered {
        match self {
            Effect::StoreDb(attributes) => attributes,
            Effect::PostEndpoint(request) => request,
        }
    }

    /// See [`Rendered::too_big`].
    pub fn too_big(&self, flow: &Flow, bounds: &StatementBounds) -> Option<String> {
        self.rendered().too_big(flow, bounds)
    }

    /// See [`Rendered::committed`].
    pub fn committed(&self, flow: &Flow) -> AfterCommit {
        self.rendered().committed(flow)
    }

    /// See [`Rendered::bytes`].
    pub fn bytes(&self, flow: &Flow) -> usize {
        self.rendered().bytes(flow)
    }
}

/// What the commit and the processor ask of an effect, whatever its action.
pub trait Rendered {
    /// Why it cannot be written in any statement the server accepts, if so: the message is then
    /// refused before anything of it (its counter included) is written.
    fn too_big(&self, flow: &Flow, bounds: &StatementBounds) -> Option<String>;
    /// What its commit leaves to do or to report.
    fn committed(&self, flow: &Flow) -> AfterCommit;
    /// About how many bytes its rows take in statements: what a write of it costs on the wire.
    fn bytes(&self, flow: &Flow) -> usize;
}

/// What became of an effect once its transaction committed, beyond its counter.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterCommit {
    /// Its rows are written; nothing is left to do.
    Done,
    /// A request waits in the outbox, whose scheduler is to be told about the flow.
    Queued,
    /// Nothing was written beyond the counter, as in the original, which found out only after
    /// incrementing it; the error line it logged then.
    NotSent(String),
}

/// One message for one flow, validated and rendered.
pub struct Item {
    /// Which message of the batch it renders: a message's items are consecutive.
    pub message: usize,
    pub flow: Arc<Flow>,
    pub topic: Arc<str>,
    pub effect: Effect,
    /// Its message's topic and payload hashed, and its RETAIN flag: what tells a resend.
    pub fingerprint: Arc<crate::retained::Fingerprint>,
}

/// The items one transaction writes, each with the `last_msg_id` it was given; each sink
/// writes the rows of its own.
#[derive(Default)]
pub struct Rows<'a> {
    written: Vec<(&'a Item, i32)>,
}

impl<'a> Rows<'a> {
    pub fn push(&mut self, item: &'a Item, msg_id: i32) {
        self.written.push((item, msg_id));
    }

    /// The items written, in arrival order.
    pub fn items(&self) -> impl Iterator<Item = &'a Item> + '_ {
        self.written.iter().map(|(item, _)| *item)
    }

    /// Every sink's rows, in statements bounded by `bounds`, in the caller's transaction.
    pub async fn write(
        &self,
        tx: &mut Transaction<'_, MySql>,
        bounds: &StatementBounds,
        received_at: NaiveDateTime,
    ) -> Result<(), sqlx::Error> {
        store_db::write(tx, bounds, received_at, &self.written).await?;
        post_endpoint::write(tx, bounds, &self.written).await
    }
}
