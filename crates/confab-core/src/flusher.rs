//! Saves the growing text of live turns, batched (SPEC §6: "saved at least
//! once a second"): each tick, `save_partials` calls of up to
//! [`FLUSH_CHUNK`] turns each carry every turn whose text grew since the
//! last one, plus a heartbeat for turns that have been quiet a while, so
//! that a sibling instance's crash recovery never mistakes a live turn for
//! a dead one. One UPDATE per stream per second would not survive 10,000
//! streams.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::ids::MessageId;
use crate::live::LiveStream;
use crate::model::PartialText;
use crate::store::{Store, StoreError};
use crate::turn::TurnMetrics;

/// The most live texts one `save_partials` call carries: at 5,000 live
/// streams a tick makes ten calls, each encoded in well under a millisecond.
pub const FLUSH_CHUNK: usize = 500;

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

/// The registry of live turns and the task that saves them (their text
/// lives in their [`LiveStream`]).
#[derive(Clone, Default)]
pub struct Flusher {
    live: Arc<Mutex<HashMap<MessageId, Arc<LiveStream>>>>,
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
        let id = {
            let mut t = locked(&self.text);
            t.text.push_str(token);
            t.lengths.push(token.len());
            let id = t.lengths.count();
            then(id);
            id
        };
        self.dirty.store(true, Ordering::Release);
        id
    }

    /// The prompt reached the model (`tokens`: its count), saved with the
    /// next flush.
    pub(crate) fn set_prompt(&self, tokens: u64) {
        {
            let mut t = locked(&self.text);
            let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
            if t.prompt_tokens == tokens {
                return;
            }
            t.prompt_tokens = tokens;
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// Its text to save, when it changed since the last save or its last
    /// save is `heartbeat` old (marked saved at `now`).
    fn take_partial(
        &self,
        id: MessageId,
        now: Instant,
        heartbeat: Duration,
    ) -> Option<PartialText> {
        let mut last_saved = locked(&self.last_saved);
        let stale = last_saved.is_none_or(|t| now.duration_since(t) >= heartbeat);
        if !(self.dirty.swap(false, Ordering::AcqRel) || stale) {
            return None;
        }
        let partial = {
            let t = locked(&self.text);
            PartialText {
                id,
                content: t.text.clone(),
                event_lengths: t.lengths.as_bytes().to_vec(),
                prompt_tokens: t.prompt_tokens,
            }
        };
        *last_saved = Some(now);
        Some(partial)
    }

    pub(crate) fn text(&self) -> String {
        locked(&self.text).text.clone()
    }

    /// The encoded event boundaries of the text so far.
    pub(crate) fn lengths(&self) -> Vec<u8> {
        locked(&self.text).lengths.as_bytes().to_vec()
    }

    /// Run `f` on the text and its events under the lock.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&TextAndEvents) -> T) -> T {
        f(&locked(&self.text))
    }
}

/// Lock `mutex`, past a panic that poisoned it. What these locks guard stays
/// whole through a panic (an append, an insert, a copy: none leaves a value
/// half-changed that a later reader could trip on), whereas giving up on a
/// poisoned lock stopped every later flush without a word, and crash
/// recovery then took the live replies for dead.
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Flusher {
    /// Save the text of `stream` (message `id`) from now on.
    pub(crate) fn register(&self, id: MessageId, stream: Arc<LiveStream>) {
        // The row was just written (begin_turn): the first heartbeat is due
        // one heartbeat interval from now, not on the next tick.
        *locked(&stream.text().last_saved) = Some(Instant::now());
        locked(&self.live).insert(id, stream);
    }

    pub(crate) fn unregister(&self, id: MessageId) {
        locked(&self.live).remove(&id);
    }

    /// How many streams are registered (for tests and metrics).
    pub fn len(&self) -> usize {
        locked(&self.live).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One flush: the dirty texts (and heartbeats older than `heartbeat`),
    /// written [`FLUSH_CHUNK`] at a time.
    pub async fn flush(&self, store: &dyn Store, metrics: &dyn TurnMetrics, heartbeat: Duration) {
        let started = Instant::now();
        let (saved, failed) = self
            .flush_with(heartbeat, |batch| async move {
                store.save_partials(&batch).await
            })
            .await;
        if failed {
            metrics.flush_failed(saved as u64, started.elapsed());
        } else if saved > 0 {
            metrics.flushed(saved as u64, started.elapsed());
        }
    }

    /// [`Self::flush`] with `save` for the store: how many texts were
    /// saved, and whether a save failed (what it held, and what was not
    /// tried after it, is saved on the next tick).
    ///
    /// At 5,000 live streams a flush copies and sends megabytes of text. In
    /// one piece, under the registry's lock, that stalled the whole server
    /// for 40–60 ms every second (sse-10k, BENCHMARKS.md): every turn that
    /// started or ended meanwhile blocked its worker thread on the lock, and
    /// the batch was encoded in one poll. The registry is now locked only
    /// to copy out its entries, and the texts are taken, saved and yielded
    /// between [`FLUSH_CHUNK`] at a time.
    pub(crate) async fn flush_with<F, Fut>(&self, heartbeat: Duration, mut save: F) -> (usize, bool)
    where
        F: FnMut(Vec<PartialText>) -> Fut,
        Fut: Future<Output = Result<(), StoreError>>,
    {
        let now = Instant::now();
        let entries: Vec<(MessageId, Arc<LiveStream>)> = locked(&self.live)
            .iter()
            .map(|(id, e)| (*id, e.clone()))
            .collect();
        let mut saved = 0;
        for chunk in entries.chunks(FLUSH_CHUNK) {
            let (taken, batch): (Vec<&LiveText>, Vec<PartialText>) = chunk
                .iter()
                .filter_map(|(id, stream)| {
                    let text = stream.text();
                    Some((text, text.take_partial(*id, now, heartbeat)?))
                })
                .unzip();
            if batch.is_empty() {
                continue;
            }
            let count = batch.len();
            if let Err(err) = save(batch).await {
                tracing::error!(error = %err, streams = count, "could not save partial replies");
                // Dirty again, so that the next tick retries them.
                for entry in taken {
                    entry.dirty.store(true, Ordering::Release);
                }
                return (saved, true);
            }
            saved += count;
            // Let the tasks queued behind this one run between chunks.
            tokio::task::yield_now().await;
        }
        (saved, false)
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    /// A live stream of message `id`, registered with `flusher`.
    fn register(flusher: &Flusher, id: MessageId) -> Arc<LiveStream> {
        let stream = Arc::new(LiveStream::new(id, crate::ids::ChatId::new(), false));
        flusher.register(id, stream.clone());
        stream
    }

    /// A flusher with `count` live texts, each with a token not yet saved.
    fn with_dirty_texts(count: usize) -> Flusher {
        let flusher = Flusher::default();
        for _ in 0..count {
            register(&flusher, MessageId::new()).text().push("token ");
        }
        flusher
    }

    #[tokio::test]
    async fn a_flush_saves_in_chunks_and_lets_other_tasks_run_between_them() {
        let flusher = with_dirty_texts(2 * FLUSH_CHUNK + 1);
        // A task that counts how often it gets to run (this runtime has
        // one thread: only when the flush yields).
        let runs = Arc::new(AtomicUsize::new(0));
        let counting = tokio::spawn({
            let runs = runs.clone();
            async move {
                loop {
                    runs.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            }
        });
        let mut calls = Vec::new();
        let (saved, failed) = flusher
            .flush_with(LONG, |batch| {
                calls.push((batch.len(), runs.load(Ordering::Relaxed)));
                async { Ok(()) }
            })
            .await;
        counting.abort();
        assert_eq!((saved, failed), (2 * FLUSH_CHUNK + 1, false));
        let sizes: Vec<usize> = calls.iter().map(|(n, _)| *n).collect();
        assert_eq!(sizes, [FLUSH_CHUNK, FLUSH_CHUNK, 1]);
        assert!(
            calls.windows(2).all(|w| w[1].1 > w[0].1),
            "other tasks ran between the chunks: {calls:?}"
        );
        // Saved: nothing is due on the next tick.
        let (again, _) = flusher.flush_with(LONG, |_| async { Ok(()) }).await;
        assert_eq!(again, 0);
    }

    #[tokio::test]
    async fn a_failed_save_leaves_its_texts_and_the_rest_to_the_next_tick() {
        let flusher = with_dirty_texts(2 * FLUSH_CHUNK);
        let (saved, failed) = flusher
            .flush_with(LONG, |_| async {
                Err(StoreError::Unavailable("the database is down".into()))
            })
            .await;
        assert_eq!((saved, failed), (0, true));
        let (saved, failed) = flusher.flush_with(LONG, |_| async { Ok(()) }).await;
        assert_eq!((saved, failed), (2 * FLUSH_CHUNK, false));
    }

    #[tokio::test]
    async fn a_panic_under_the_locks_does_not_stop_later_flushes() {
        let flusher = with_dirty_texts(1);
        let id = MessageId::new();
        let stream = register(&flusher, id);
        let text = stream.text();
        // Poison the registry's lock and one text's, as a panic while
        // holding them would.
        let (live, poisoned) = (flusher.live.clone(), stream.clone());
        let panicked = std::thread::spawn(move || {
            let _registry = live.lock();
            let _text = poisoned.text().text.lock();
            panic!("a panic while holding the flusher's locks");
        })
        .join();
        assert!(panicked.is_err() && flusher.live.is_poisoned() && text.text.is_poisoned());

        assert_eq!(text.push("still "), 1);
        assert_eq!(text.push("here"), 2);
        let mut contents = Vec::new();
        let (saved, failed) = flusher
            .flush_with(LONG, |batch| {
                contents.extend(batch.into_iter().map(|p| (p.id, p.content)));
                async { Ok(()) }
            })
            .await;
        assert_eq!((saved, failed), (2, false));
        assert!(
            contents.contains(&(id, "still here".to_owned())),
            "{contents:?}"
        );
        flusher.unregister(id);
        assert_eq!(flusher.len(), 1);
    }
}
