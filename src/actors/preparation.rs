//! The Preparation step: recipients → messages, in chunks, each chunk committed with its
//! checkpoint so that a restart continues where it stopped and inserts nothing twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt, TryFutureExt};

use super::gates::Gate;
use super::{Deps, StepEnd};
use crate::domain::batch::{PartitionCount, partition_for};
use crate::domain::phone::{E164Phone, Region};
use crate::domain::seen::SeenNumbers;
use crate::domain::sms::analyze;
use crate::domain::template::Template;
use crate::store::models::{Batch, NewMessage, Recipient};
use crate::store::{Backend, ChunkWritten, PreparedChunk, StoreError};

/// Chunks read and prepared ahead of those being written.
const AHEAD: usize = 2;

/// Chunks written at once on PostgreSQL, each in its own transaction: one writer keeps one of
/// the server's backends busy, and the inserts are most of preparation's work.
const WRITERS: usize = 2;

/// Recipients from which a batch is large enough for its preparation to end by refreshing the
/// planner's statistics of `messages` (planned against statistics that do not know its rows,
/// delivery's statements would walk a whole partition to find a slice) and handing freed memory
/// back. Both cost tens of milliseconds, once per large batch; for thousands of small batches
/// they were most of the database's work, and their rows change the statistics little
/// (autovacuum refreshes them as the table grows).
const LARGE_BATCH: i64 = 10_000;

/// Messages a run of a large batch writes on PostgreSQL before it refreshes the statistics of
/// `messages` once on its way, besides at its end. Statistics taken before the batch had rows
/// give its id no rows at all, and each chunk's lookup of the numbers the batch may already have
/// was then planned as a walk of the batch's messages instead of probes of its (batch, phone)
/// index: 91 ms per chunk with 300,000 of them written, so that a batch of a million behind two
/// others took 133-143 s instead of 19-21 (BENCHMARKS.md, "A 1M batch behind two 1M batches was
/// six times slower").
const REFRESH_AFTER: i64 = LARGE_BATCH;

/// How long a run keeps its turn among the instance's steps before it gives it up, between two
/// chunks, to steps waiting for one.
const TURN: Duration = Duration::from_millis(100);

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

impl PreparationError {
    /// True when preparation stopped because the database was out of reach.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, PreparationError::Store(e) if e.is_unavailable())
    }

    /// True when a newer run of the batch's preparation started (`StoreError::Superseded`).
    pub fn is_superseded(&self) -> bool {
        matches!(self, PreparationError::Store(StoreError::Superseded(_)))
    }
}

/// How the reader of a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// It read the batch's last recipient; its id (the run's start if there was none to read).
    End(i64),
    /// It stopped before: the gate closed, or the writers stopped taking chunks.
    Stopped,
}

/// How the writers of a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    /// Every chunk the reader sent is committed.
    All,
    /// The gate closed: the chunks being written were finished, no more were taken.
    Stopped,
}

/// Runs (or continues) preparation of a batch until it is done or the gate closes.
///
/// The run starts by taking the batch's next run number (`Store::begin_preparation_run`), then
/// continues from the committed checkpoint. When the gate closes, no new chunk is taken, and
/// the chunks already being written are finished (committed, or rolled back on an error) before
/// the run returns: once it has, nothing of it is still writing, and the next run starts from a
/// checkpoint that will not move behind its back. The run is `Finished` only when its reader
/// read the last recipient and every chunk it read is committed.
#[tracing::instrument(name = "preparation", skip_all, fields(batch_id = %batch.public_id, step = "preparation"), err)]
pub async fn run(deps: Deps, batch: Batch, gate: Arc<Gate>) -> Result<StepEnd, PreparationError> {
    let core = &deps.core;
    let template = Arc::new(
        Template::parse(&batch.content).map_err(|e| PreparationError::Template(e.to_string()))?,
    );
    let partitions = PartitionCount::new(i64::from(batch.partition_count))
        .map_err(|e| PreparationError::Template(e.to_string()))?;
    let url: Arc<Option<String>> = Arc::new(batch.url.clone());
    let chunk_size = core.settings.smsbatch.batch_size as i64;
    let max_segments = core.settings.http.max_segments;
    let store = &core.store;
    let batch_id = batch.id;
    // Its turn among the instance's steps; a pause while it waits ends the run.
    let Some(place) = super::take_turn(core, &batch, &gate).await else {
        return Ok(StepEnd::Stopped);
    };
    // First the run's number, then the checkpoint: a chunk of an earlier run is either
    // committed before the number changes, and counted in the checkpoint read after, or it
    // finds the number changed and rolls back.
    let run = store.begin_preparation_run(batch_id).await?;
    // With the chunks that writers side by side committed ahead of it before a restart. Before
    // the first chunk is committed there is nothing to read: a batch's first run (every small
    // batch's only one) starts at the beginning without asking.
    let (start, written) = if run.processed == 0 {
        (0, Vec::new())
    } else {
        store.preparation_start(batch_id).await?
    };
    let run = run.number;
    // SQLite has one writer at a time anyway.
    let writers = match store.backend() {
        Backend::Postgres => WRITERS,
        Backend::Sqlite => 1,
    };
    // A run that starts on a batch with no messages yet sees every number written: PostgreSQL's
    // chunks then look up, of their numbers, only those this run may have seen before.
    let mut seen = (store.backend() == Backend::Postgres && start == 0 && written.is_empty())
        .then(SeenNumbers::new);

    // The reader reads chunks in recipient order and prepares each on the blocking pool, up to
    // `AHEAD` chunks ahead of the writers, while they write: the two run side by side (joined
    // below, not spawned).
    // Each chunk goes with its first recipient and whether it is the run's last.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(i64, PreparedChunk, bool)>(AHEAD);
    let seconds = |stage: &str| core.metrics.preparation_seconds.with_label_values(&[stage]);
    let (reading, preparing, writing) =
        (seconds("reading"), seconds("preparing"), seconds("writing"));
    let reader = async {
        // Owned by the reader, so that the channel closes, ending the writers, when it ends.
        let tx = tx;
        // The run's turn among the instance's steps goes with the reader: between chunks it is
        // given up while other steps wait, and taken again behind them (transactional first),
        // so that a large batch takes turns with the small ones instead of making them wait
        // until it is prepared.
        let mut place = Some(place);
        let mut held_since = Instant::now();
        // Whether the last read filled a chunk: only then may more recipients follow (none are
        // added once preparation has started). A small batch's run keeps its turn to the end.
        let mut more = false;
        let mut after = start;
        loop {
            if !gate.is_open() {
                return Ok::<_, PreparationError>(Read::Stopped);
            }
            if more && held_since.elapsed() >= TURN && core.steps.is_waited() {
                drop(place.take());
                place = super::take_turn(core, &batch, &gate).await;
                if place.is_none() {
                    return Ok(Read::Stopped);
                }
                held_since = Instant::now();
            }
            let started = Instant::now();
            let rows = store.recipients_after(batch_id, after, chunk_size).await?;
            reading.inc_by(started.elapsed().as_secs_f64());
            more = rows.len() as i64 >= chunk_size;
            let Some(last) = rows.last().map(|r| r.id) else {
                return Ok(Read::End(after));
            };
            after = last;
            // After a restart, recipients of chunks committed ahead of the checkpoint are done.
            let rows: Vec<Recipient> = rows
                .into_iter()
                .filter(|r| !written.iter().any(|&(f, l)| (f..=l).contains(&r.id)))
                .collect();
            let Some(first) = rows.first().map(|r| r.id) else {
                if more {
                    continue;
                }
                return Ok(Read::End(after));
            };
            let (template, url, region) = (template.clone(), url.clone(), core.region);
            let started = Instant::now();
            let mut numbers = seen.take();
            let (chunk, numbers) = tokio::task::spawn_blocking(move || {
                let mut chunk = prepare_chunk(
                    batch_id,
                    &template,
                    url.as_deref(),
                    region,
                    partitions,
                    max_segments,
                    rows,
                );
                if let Some(numbers) = numbers.as_mut() {
                    chunk.repeats = Some(
                        chunk
                            .messages
                            .iter()
                            .filter(|m| numbers.insert(&m.phone))
                            .map(|m| m.phone.clone())
                            .collect(),
                    );
                }
                (chunk, numbers)
            })
            .await
            .map_err(|e| PreparationError::Join(e.to_string()))?;
            seen = numbers;
            preparing.inc_by(started.elapsed().as_secs_f64());
            // Fails once the writers closed the channel: they stopped taking chunks.
            if tx.send((first, chunk, !more)).await.is_err() {
                return Ok(Read::Stopped);
            }
            if !more {
                return Ok(Read::End(after));
            }
        }
    };

    // Up to `writers` chunks are written at once, each in its own transaction; results come
    // back in chunk order, which tells how far every chunk is committed (the checkpoint).
    let done_up_to = AtomicI64::new(start);
    // The furthest checkpoint a chunk of this run committed itself (-1: none did).
    let checkpoint_written = AtomicI64::new(-1);
    // `alone`: every earlier chunk is committed, so this one may move the checkpoint past itself.
    let write = |first: i64, chunk: PreparedChunk, alone: bool| {
        let last = chunk.last_recipient_id;
        let invalid = chunk.invalid;
        let (range, checkpoint) = if writers > 1 && !alone {
            (Some(first), done_up_to.load(Ordering::Acquire))
        } else {
            (None, last)
        };
        let checkpoint_written = &checkpoint_written;
        let writing = writing.clone();
        let started = Instant::now();
        store
            .write_prepared_chunk_beside(batch_id, chunk, run, range, checkpoint)
            .map_ok(move |written| {
                checkpoint_written.fetch_max(checkpoint, Ordering::AcqRel);
                writing.inc_by(started.elapsed().as_secs_f64());
                (last, invalid, written)
            })
    };
    let writer = async {
        let mut in_flight = FuturesOrdered::new();
        // Taking chunks until the gate closes, a write fails or the reader ends.
        let mut taking = true;
        let mut outcome: Result<Written, PreparationError> = Ok(Written::All);
        // The refresh on the way (`REFRESH_AFTER`), beside the writes; the run ends only after
        // it, so that no statement is dropped half-way.
        let mut inserted = 0;
        let mut refresh_due =
            store.backend() == Backend::Postgres && batch.recipients >= LARGE_BATCH;
        let mut refreshing = false;
        let mut refresh = std::pin::pin!(store.analyze_messages().fuse());
        loop {
            tokio::select! {
                // A chunk written (in chunk order) is counted before anything else is looked at.
                biased;
                Some(result) = in_flight.next(), if !in_flight.is_empty() => match result {
                    Ok((last, invalid, written)) => {
                        done_up_to.store(last, Ordering::Release);
                        count_rows(core, invalid, &written);
                        inserted += written.inserted;
                        if refresh_due && inserted >= REFRESH_AFTER {
                            (refresh_due, refreshing) = (false, true);
                        }
                    }
                    Err(e) => {
                        // The other chunks being written still finish: nothing is dropped
                        // half-way.
                        if outcome.is_ok() {
                            outcome = Err(PreparationError::from(e));
                        }
                        taking = false;
                        rx.close();
                    }
                },
                () = gate.closed(), if taking => {
                    taking = false;
                    outcome = Ok(Written::Stopped);
                    // The reader's next send fails, however the gate moves from now on.
                    rx.close();
                }
                next = rx.recv(), if taking && in_flight.len() < writers => match next {
                    Some((first, chunk, last)) => {
                        // The run's last chunk, with every earlier one committed, commits the
                        // checkpoint of the whole run itself.
                        let alone = last && in_flight.is_empty();
                        in_flight.push_back(write(first, chunk, alone));
                    }
                    None => taking = false,
                },
                refreshed = &mut refresh, if refreshing => {
                    refreshing = false;
                    // Only the plans of the next statements depend on it: the run goes on.
                    if let Err(e) = refreshed {
                        tracing::warn!(error = %e, "Could not refresh the statistics of messages.");
                    }
                }
            }
            if !taking && in_flight.is_empty() && !refreshing {
                return outcome;
            }
        }
    };
    let (read, written) = tokio::join!(reader, writer);
    let (read, written) = (read?, written?);
    if let (Read::End(last_read), Written::All) = (read, written) {
        // Every chunk up to the last recipient read is committed: the checkpoint says so, and
        // the ranges kept for chunks committed ahead of it are gone (already, when the last
        // chunk committed them itself).
        if checkpoint_written.load(Ordering::Acquire) < last_read {
            store.advance_checkpoint(batch_id, run, last_read).await?;
        }
        if batch.recipients >= LARGE_BATCH {
            store.analyze_messages().await?;
            crate::memory::release_freed_memory();
        }
        tracing::info!(batch_id = %batch.public_id, "Preparation finished.");
        return Ok(StepEnd::Finished);
    }
    // Stopped early: what is committed in chunk order is the checkpoint of the next run.
    let committed = done_up_to.load(Ordering::Acquire);
    if committed > start {
        store.advance_checkpoint(batch_id, run, committed).await?;
    }
    Ok(StepEnd::Stopped)
}

/// Counts a written chunk's rows in the metrics.
fn count_rows(core: &super::Core, invalid: i64, written: &ChunkWritten) {
    let rows = &core.metrics.preparation_rows;
    rows.with_label_values(&["valid"])
        .inc_by(written.inserted as u64);
    rows.with_label_values(&["invalid"]).inc_by(invalid as u64);
    rows.with_label_values(&["duplicate"])
        .inc_by(written.duplicates as u64);
    rows.with_label_values(&["opted_out"])
        .inc_by(written.opted_out as u64);
}

/// Validates and renders one chunk of recipients (pure: no I/O). A recipient is invalid when
/// its number is not a valid number, the template needs a var it does not have, or its message
/// would take more than `max_segments` segments (`http.max_segments`: at creation only the
/// template's own text could be checked).
pub fn prepare_chunk(
    batch_id: i64,
    template: &Template,
    url: Option<&str>,
    region: Region,
    partitions: PartitionCount,
    max_segments: u32,
    rows: Vec<Recipient>,
) -> PreparedChunk {
    let now = chrono::Utc::now().naive_utc();
    let mut chunk = PreparedChunk {
        messages: Vec::with_capacity(rows.len()),
        last_recipient_id: rows.last().map(|r| r.id).unwrap_or(0),
        processed: rows.len() as i64,
        invalid: 0,
        repeats: None,
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
        if parts.segments > max_segments {
            chunk.invalid += 1;
            continue;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn recipient(id: i64, phone: &str, vars: Option<&str>) -> Recipient {
        Recipient {
            id,
            batch_id: 1,
            phone: phone.into(),
            vars: vars.map(str::to_owned),
        }
    }

    #[test]
    fn invalid_numbers_missing_vars_and_long_messages_are_counted_invalid() {
        let template = Template::parse("Hi {{name}} {{url}}").expect("template");
        let region: Region = "CN".parse().expect("region");
        let partitions = PartitionCount::new(4).expect("partitions");
        let long = "x".repeat(400);
        let rows = vec![
            recipient(1, "+86 138 0000 1234", Some(r#"{"name":"Ann"}"#)),
            recipient(2, "12345", Some(r#"{"name":"Bo"}"#)),
            recipient(3, "+8613800001235", None),
            recipient(
                4,
                "+8613800001236",
                Some(&format!(r#"{{"name":"{long}"}}"#)),
            ),
            recipient(5, "13800001237", Some(r#"{"name":"王芳"}"#)),
        ];
        let chunk = prepare_chunk(
            7,
            &template,
            Some("https://s.example/x"),
            region,
            partitions,
            2,
            rows,
        );
        assert_eq!((chunk.processed, chunk.invalid), (5, 3));
        assert_eq!(chunk.last_recipient_id, 5);
        let got: Vec<(&str, &str, &str, i32)> = chunk
            .messages
            .iter()
            .map(|m| {
                (
                    m.phone.as_str(),
                    m.body.as_str(),
                    m.encoding.as_str(),
                    m.segments,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("+8613800001234", "Hi Ann https://s.example/x", "gsm7", 1),
                ("+8613800001237", "Hi 王芳 https://s.example/x", "ucs2", 1),
            ]
        );
        assert!(chunk.messages.iter().all(|m| m.batch_id == 7));
        assert_eq!(chunk.messages[0].partition, partition_for(1, partitions));
    }
}
