//! The Preparation step: recipients → messages, in chunks, each chunk committed with its
//! checkpoint so that a restart continues where it stopped and inserts nothing twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use futures_util::{TryFutureExt, TryStreamExt};

use super::gates::Gate;
use super::{Deps, StepEnd};
use crate::domain::batch::{PartitionCount, partition_for};
use crate::domain::phone::{E164Phone, Region};
use crate::domain::sms::analyze;
use crate::domain::template::Template;
use crate::store::models::{Batch, NewMessage, Recipient};
use crate::store::{PreparedChunk, StoreError};

/// Chunks read and prepared ahead of the one being written.
const AHEAD: usize = 3;

/// Why preparation could not go on.
#[derive(Debug, thiserror::Error)]
pub enum PreparationError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The batch's template does not parse (it was checked at creation, so the row is corrupt).
    #[error("template: {0}")]
    Template(String),
    /// The blocking chunk task died.
    #[error("preparation chunk task failed: {0}")]
    Join(String),
}

/// Runs (or continues) preparation of a batch until it is done or the gate closes.
#[tracing::instrument(skip_all, fields(batch_id = %batch.public_id, step = "preparation"), err)]
pub async fn run(deps: Deps, batch: Batch, gate: Arc<Gate>) -> Result<StepEnd, PreparationError> {
    let core = &deps.core;
    let template = Arc::new(
        Template::parse(&batch.content).map_err(|e| PreparationError::Template(e.to_string()))?,
    );
    let partitions = PartitionCount::new(i64::from(batch.partition_count))
        .map_err(|e| PreparationError::Template(e.to_string()))?;
    let url: Arc<Option<String>> = Arc::new(batch.url.clone());
    let chunk_size = core.settings.smsbatch.batch_size as i64;
    let start = core.store.checkpoint(batch.id, "preparation").await?;
    let (store, batch_id) = (core.store.clone(), batch.id);
    // Chunks are read and prepared ahead of the writer, up to `AHEAD` at a time, so that reading,
    // the CPU work (on the blocking pool, on every core) and writing overlap. The writer takes
    // them in order, so the checkpoint written with each chunk stays exact.
    let chunks = futures_util::stream::try_unfold(start, move |after| {
        let store = store.clone();
        async move {
            let rows = store.recipients_after(batch_id, after, chunk_size).await?;
            Ok::<_, PreparationError>(rows.last().map(|r| r.id).map(|last| (rows, last)))
        }
    })
    .map_ok(|rows| {
        let (template, url, region) = (template.clone(), url.clone(), core.region);
        tokio::task::spawn_blocking(move || {
            prepare_chunk(
                batch_id,
                &template,
                url.as_deref(),
                region,
                partitions,
                rows,
            )
        })
        .map_err(|e| PreparationError::Join(e.to_string()))
    })
    .try_buffered(AHEAD);
    let mut chunks = std::pin::pin!(chunks);
    let seconds = &core.metrics.preparation_seconds;
    let (waiting, writing) = (
        seconds.with_label_values(&["waiting"]),
        seconds.with_label_values(&["writing"]),
    );
    loop {
        if !gate.is_open() {
            return Ok(StepEnd::Stopped);
        }
        let started = Instant::now();
        let next = chunks.try_next().await?;
        waiting.inc_by(started.elapsed().as_secs_f64());
        let Some(chunk) = next else {
            core.store.analyze_messages().await?;
            tracing::info!(batch_id = %batch.public_id, "Preparation finished.");
            return Ok(StepEnd::Finished);
        };
        if !gate.is_open() {
            return Ok(StepEnd::Stopped);
        }
        let invalid = chunk.invalid;
        let started = Instant::now();
        let written = core.store.write_prepared_chunk(batch.id, chunk).await?;
        writing.inc_by(started.elapsed().as_secs_f64());
        let rows = &core.metrics.preparation_rows;
        rows.with_label_values(&["valid"])
            .inc_by(written.inserted as u64);
        rows.with_label_values(&["invalid"]).inc_by(invalid as u64);
        rows.with_label_values(&["duplicate"])
            .inc_by(written.duplicates as u64);
        rows.with_label_values(&["opted_out"])
            .inc_by(written.opted_out as u64);
    }
}

/// Validates and renders one chunk of recipients (pure: no I/O).
pub fn prepare_chunk(
    batch_id: i64,
    template: &Template,
    url: Option<&str>,
    region: Region,
    partitions: PartitionCount,
    rows: Vec<Recipient>,
) -> PreparedChunk {
    let now = chrono::Utc::now().naive_utc();
    let mut chunk = PreparedChunk {
        messages: Vec::with_capacity(rows.len()),
        last_recipient_id: rows.last().map(|r| r.id).unwrap_or(0),
        processed: rows.len() as i64,
        invalid: 0,
    };
    for row in rows {
        let Ok(phone) = E164Phone::parse(&row.phone, region) else {
            chunk.invalid += 1;
            continue;
        };
        let vars: HashMap<String, String> = row
            .vars
            .as_deref()
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or_default();
        let rendered = template.render(|name| {
            if let (Some(url), "url") = (url, name) {
                return Some(url);
            }
            vars.get(name).map(String::as_str)
        });
        let Ok(body) = rendered else {
            chunk.invalid += 1;
            continue;
        };
        let parts = analyze(&body);
        chunk.messages.push(NewMessage {
            batch_id,
            partition: partition_for(row.id, partitions),
            recipient_id: row.id,
            phone: phone.into_string(),
            body,
            encoding: parts.encoding.as_str().to_string(),
            segments: parts.segments as i32,
            updated_at: now,
        });
    }
    chunk
}
