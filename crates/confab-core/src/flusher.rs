//! Saves the growing text of live turns, batched (SPEC §6: "saved at least
//! once a second"): one `save_partials` call per tick carries every turn
//! whose text grew since the last one, plus a heartbeat for turns that have
//! been quiet a while, so that a sibling instance's crash recovery never
//! mistakes a live turn for a dead one. One UPDATE per stream per second
//! would not survive 10,000 streams.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::ids::MessageId;
use crate::model::PartialText;
use crate::store::Store;
use crate::turn::TurnMetrics;

/// The text of one live stream, shared between its generator, the flusher
/// and the stream's readers: the text and where each token event ends in it
/// ([`crate::live::EventLengths`]), changed together under one lock so that a
/// save or a replay never sees one without the other (SPEC §14).
#[derive(Default)]
pub(crate) struct LiveText {
    text: Mutex<TextAndEvents>,
    dirty: AtomicBool,
    last_saved: Mutex<Option<Instant>>,
}

#[derive(Default)]
pub(crate) struct TextAndEvents {
    pub(crate) text: String,
    pub(crate) lengths: crate::live::EventLengths,
    /// See [`PartialText::prompt_tokens`].
    pub(crate) prompt_tokens: i64,
}

/// The registry of live turns and the task that saves them.
#[derive(Clone, Default)]
pub struct Flusher {
    live: Arc<Mutex<HashMap<MessageId, Arc<LiveText>>>>,
}

impl LiveText {
    /// Append one token event; its event id (1, 2, …).
    pub(crate) fn push(&self, token: &str) -> u64 {
        self.push_then(token, |_| {})
    }

    /// [`Self::push`], then `then(id)` still under the lock: what `then`
    /// does is ordered with whatever [`Self::with`] does (the relay's
    /// backfill, [`crate::live::LiveHub::relay_on_demand`]).
    pub(crate) fn push_then(&self, token: &str, then: impl FnOnce(u64)) -> u64 {
        let id = match self.text.lock() {
            Ok(mut t) => {
                t.text.push_str(token);
                t.lengths.push(token.len());
                let id = t.lengths.count();
                then(id);
                id
            }
            Err(_) => 0,
        };
        self.dirty.store(true, Ordering::Release);
        id
    }

    /// The prompt reached the model (`tokens`: its count), saved with the
    /// next flush.
    pub(crate) fn set_prompt(&self, tokens: u64) {
        if let Ok(mut t) = self.text.lock() {
            let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
            if t.prompt_tokens == tokens {
                return;
            }
            t.prompt_tokens = tokens;
        }
        self.dirty.store(true, Ordering::Release);
    }

    pub(crate) fn text(&self) -> String {
        self.text.lock().map(|t| t.text.clone()).unwrap_or_default()
    }

    /// The encoded event boundaries of the text so far.
    pub(crate) fn lengths(&self) -> Vec<u8> {
        self.text
            .lock()
            .map(|t| t.lengths.as_bytes().to_vec())
            .unwrap_or_default()
    }

    /// Run `f` on the text and its events under the lock.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&TextAndEvents) -> T) -> Option<T> {
        self.text.lock().ok().map(|t| f(&t))
    }
}

impl Flusher {
    pub(crate) fn register(&self, id: MessageId) -> Arc<LiveText> {
        // The row was just written (begin_turn): the first heartbeat is due
        // one heartbeat interval from now, not on the next tick.
        let entry = Arc::new(LiveText {
            last_saved: Mutex::new(Some(Instant::now())),
            ..LiveText::default()
        });
        if let Ok(mut live) = self.live.lock() {
            live.insert(id, entry.clone());
        }
        entry
    }

    pub(crate) fn unregister(&self, id: MessageId) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(&id);
        }
    }

    /// How many streams are registered (for tests and metrics).
    pub fn len(&self) -> usize {
        self.live.lock().map(|l| l.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One flush: the batch of dirty texts (and heartbeats older than
    /// `heartbeat`), written at once.
    pub async fn flush(&self, store: &dyn Store, metrics: &dyn TurnMetrics, heartbeat: Duration) {
        let now = Instant::now();
        let batch: Vec<PartialText> = {
            let Ok(live) = self.live.lock() else { return };
            live.iter()
                .filter_map(|(id, entry)| {
                    let stale = entry
                        .last_saved
                        .lock()
                        .map(|t| t.is_none_or(|t| now.duration_since(t) >= heartbeat))
                        .unwrap_or(true);
                    if !(entry.dirty.swap(false, Ordering::AcqRel) || stale) {
                        return None;
                    }
                    let partial = entry
                        .text
                        .lock()
                        .map(|t| PartialText {
                            id: *id,
                            content: t.text.clone(),
                            event_lengths: t.lengths.as_bytes().to_vec(),
                            prompt_tokens: t.prompt_tokens,
                        })
                        .ok()?;
                    if let Ok(mut saved) = entry.last_saved.lock() {
                        *saved = Some(now);
                    }
                    Some(partial)
                })
                .collect()
        };
        if batch.is_empty() {
            return;
        }
        let started = Instant::now();
        match store.save_partials(&batch).await {
            Ok(()) => metrics.flushed(batch.len() as u64, started.elapsed()),
            Err(err) => {
                metrics.flush_failed(started.elapsed());
                tracing::error!(error = %err, streams = batch.len(), "could not save partial replies");
                // Mark them dirty again so the next tick retries.
                if let Ok(live) = self.live.lock() {
                    for partial in &batch {
                        if let Some(entry) = live.get(&partial.id) {
                            entry.dirty.store(true, Ordering::Release);
                        }
                    }
                }
            }
        }
    }

    /// Flush every `interval` until `stop` is cancelled. Quiet streams are
    /// re-saved well within `stale_after`, the age at which crash recovery
    /// (here or on a sibling instance) takes a `streaming` row for dead.
    pub async fn run(
        self,
        store: Arc<dyn Store>,
        metrics: Arc<dyn TurnMetrics>,
        interval: Duration,
        stale_after: Duration,
        stop: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Config guarantees stale_after >= 2 * interval, so a heartbeat due at
        // stale_after / 3 goes out on the next tick, before the row is stale.
        let heartbeat = (interval * 3).min(stale_after / 3);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticker.tick() => self.flush(store.as_ref(), metrics.as_ref(), heartbeat).await,
            }
        }
    }
}
