//! Group commit: the turn writes that arrive together (begin-turn inserts,
//! final writes with their ledger rows, ledger rows of stateless turns) go to
//! PostgreSQL in shared transactions.
//!
//! A few writer tasks take turns at the queue: each takes whatever is waiting
//! (up to [`MAX_BATCH`]) and writes it by kind — the begins first (what new
//! streams wait for before their first token), then the final writes, then
//! the rest — each kind as one statement where it can be: one commit and one
//! WAL flush for all of them instead of one each, and each kind answered as
//! soon as it has committed (a caller needs only its own write durable, so a
//! begin never waits for the final writes it was queued with). The begins
//! of a batch are one multi-row statement per shape — new chat, existing
//! chat (a chat's further turns go into further statements, in one
//! transaction then) — and its final writes one multi-row statement, so a
//! batch costs a round trip per kind, not one per turn: on a saturated
//! machine every round trip also waits for the CPU, twice. The multi-row
//! statements are planned for their arrays on every run: a cached generic
//! plan of `UPDATE messages … FROM unnest(…)` made while the table was small
//! kept a hash join over a sequential scan of it until the next autoanalyze.
//! A writer keeps its connection from one batch to the next (sqlx pings a
//! connection given back to its pool, a round trip per batch).
//! Nobody waits for a batch to fill: at light load every write finds an idle
//! writer and runs at once, so a lone turn pays two task hand-offs
//! (microseconds) and nothing else. Batches form only while every writer is
//! busy, i.e. exactly when commits would otherwise queue for the pool. Each
//! caller is answered only after the statement (or transaction) holding its
//! write has committed.
//!
//! Every statement sent here is self-contained and safe to replay (see
//! [`crate::PostgresStore`]'s `retry`), so a batch that fails for any reason
//! (a dead connection, a conflict of one of its writes, a deadlock with
//! another transaction) is undone as a whole and each of its callers then
//! runs its own statement alone, with the usual dead-connection retry: one
//! write's failure is never another's. Writes are ordered by chat within a
//! kind so that two batches take the chats' row locks in the same order.
//!
//! Hand-written because what it needs — answering each caller after a shared
//! commit, falling back per caller — is specific to these statements; no
//! crate batches arbitrary sqlx queries into transactions.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use confab_core::PoolConfig;
use confab_core::store::GroupCommitStats;
use confab_store_sql::patient_acquire;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgPool, PgRow, Postgres};
use sqlx::query::Query;
use sqlx::{Connection, Error, Row};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::time::Instant;
use uuid::Uuid;

use crate::{Begin, Finish, begin_statement, finish_statement};

/// The most writes one transaction carries.
pub(crate) const MAX_BATCH: usize = 128;

/// A write's statement, built by its caller (its arguments are encoded
/// already, so it owns them).
pub(crate) type Statement = Query<'static, Postgres, PgArguments>;

/// A write the writers are asked to do.
pub(crate) enum Write {
    /// A statement, run as it is.
    Statement(Statement),
    /// A turn's begin without an idempotency key: the begins of a batch are
    /// written as one multi-row statement per shape (see
    /// [`crate::begin_statement`]).
    Begin(Begin),
    /// A turn's final write without an idempotent response: the final
    /// writes of a batch are one statement (see [`crate::finish_statement`]).
    Finish(Finish),
}

impl Write {
    /// Which writes of a batch are written together: begins, then final
    /// writes, then the other statements.
    fn kind(&self) -> usize {
        match self {
            Write::Begin(_) => 0,
            Write::Finish(_) => 1,
            Write::Statement(_) => 2,
        }
    }
}

/// What the writers answer a caller.
pub(crate) enum Answer {
    /// The write is committed; these are its statement's rows.
    Done(Vec<PgRow>),
    /// Its batch failed and was rolled back: run the statement alone.
    RunAlone,
}

struct Job {
    write: Write,
    /// Row-lock order within a batch (the chat's id).
    chat: Uuid,
    /// A turn's first write, which is refused (`PoolTimedOut`) rather than
    /// queued past `DB_ACQUIRE_TIMEOUT_MS`. Its caller gives up at the
    /// deadline unless a writer has taken the job by then: who moves
    /// `state` first decides, so a write is never done for a caller that
    /// was told it was refused.
    impatient: Option<Arc<AtomicU8>>,
    reply: oneshot::Sender<Result<Answer, Error>>,
}

const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const ABANDONED: u8 = 2;

/// Move `state` from queued to `to`; whether this side won.
fn settle(state: &AtomicU8, to: u8) -> bool {
    state
        .compare_exchange(QUEUED, to, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

#[derive(Default)]
struct Stats {
    transactions: AtomicU64,
    writes: AtomicU64,
    fallbacks: AtomicU64,
}

/// The queue and its writers. Dropping the last handle stops the writers
/// once the queue is empty.
pub(crate) struct GroupCommit {
    queue: mpsc::UnboundedSender<Job>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// How many writers a pool of `max_connections` gets: up to half of its
    /// connections (the rest serve reads, keyed turns and the partial-text
    /// flushes), at most 4 — beyond that more writers only make smaller
    /// batches.
    pub(crate) fn writers_for(max_connections: u32) -> usize {
        usize::try_from(max_connections / 2)
            .unwrap_or(1)
            .clamp(1, 4)
    }

    /// Start the writer tasks of a pool of `max_connections` on the current
    /// runtime ([`GroupCommit::writers_for`]). Writers keep their
    /// connections between batches only when that leaves the pool at least
    /// one for everything else (not with `DB_POOL_MAX=1`, where a kept
    /// connection would starve every read).
    pub(crate) fn start(pool: PgPool, max_connections: u32) -> GroupCommit {
        let writers = Self::writers_for(max_connections);
        let keep = u32::try_from(writers).is_ok_and(|w| w < max_connections);
        let (queue, jobs) = mpsc::unbounded_channel();
        let jobs = Arc::new(Mutex::new(jobs));
        let stats = Arc::new(Stats::default());
        for _ in 0..writers {
            tokio::spawn(writer(pool.clone(), jobs.clone(), stats.clone(), keep));
        }
        GroupCommit { queue, stats }
    }

    /// Queue `write` and wait for its answer. `wait_at_most`: for a
    /// turn's first write, how long it may wait for a writer and a
    /// connection (then `PoolTimedOut`, nothing written). `Err` only for a
    /// write that did not run (`PoolTimedOut`, or `PoolClosed` once the
    /// store is closing).
    pub(crate) async fn submit(
        &self,
        write: Write,
        chat: Uuid,
        wait_at_most: Option<Duration>,
    ) -> Result<Answer, Error> {
        let (reply, mut answer) = oneshot::channel();
        let impatient = wait_at_most.map(|_| Arc::new(AtomicU8::new(QUEUED)));
        let job = Job {
            write,
            chat,
            impatient: impatient.clone(),
            reply,
        };
        if self.queue.send(job).is_err() {
            return Err(Error::PoolClosed);
        }
        if let (Some(wait), Some(state)) = (wait_at_most, &impatient) {
            match tokio::time::timeout(wait, &mut answer).await {
                Ok(answered) => return answered.unwrap_or(Err(Error::PoolClosed)),
                Err(_) if settle(state, ABANDONED) => return Err(Error::PoolTimedOut),
                // A writer has it: its answer is on the way.
                Err(_) => {}
            }
        }
        // A writer that goes away (the runtime shutting down) drops the reply.
        answer.await.unwrap_or(Err(Error::PoolClosed))
    }

    pub(crate) fn stats(&self) -> GroupCommitStats {
        GroupCommitStats {
            transactions: self.stats.transactions.load(Ordering::Relaxed),
            writes: self.stats.writes.load(Ordering::Relaxed),
            fallbacks: self.stats.fallbacks.load(Ordering::Relaxed),
        }
    }
}

/// A writer's own connection, kept from one batch to the next.
///
/// sqlx answers every connection handed back to its pool with a ping (a
/// round trip, and a task to run it) before another caller may take it: a
/// writer that took a pooled connection per batch paid that for every
/// batch, ≈ 1.4 round trips per streamed turn at a thousand streams. A
/// connection kept is one the writer knows: it served the last batch, or
/// it is given back (after [`KEEP_IDLE_AT_MOST`] unused, or when its batch
/// failed) and the next batch takes one the pool checks.
struct Kept {
    conn: PoolConnection<Postgres>,
    used: Instant,
}

/// A kept connection unused for longer is given back (the pool pings a
/// connection idle this long before handing it out again; see
/// `PING_IF_IDLE_FOR` in the store).
const KEEP_IDLE_AT_MOST: Duration = Duration::from_secs(30);

/// One writer: wait for the queue, take what is there, write it, repeat.
/// `keep`: whether it keeps its connection from one batch to the next.
async fn writer(
    pool: PgPool,
    jobs: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>,
    stats: Arc<Stats>,
    keep: bool,
) {
    let mut kept: Option<Kept> = None;
    // Closing the pool waits for every connection to come back: the kept
    // one is given back then (by returning), not held until a next batch.
    let mut closing = pool.close_event();
    loop {
        let mut batch = Vec::new();
        let idle_until = kept.as_ref().map(|k| k.used + KEEP_IDLE_AT_MOST);
        let taken = tokio::select! {
            biased;
            () = &mut closing => 0,
            // Unused for KEEP_IDLE_AT_MOST: given back while waiting, not
            // only when the next batch comes.
            () = async {
                match idle_until {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                kept = None;
                continue;
            }
            // One writer at a time waits at the queue; the others are
            // writing or waiting for their turn here. (`recv_many` is
            // cancel-safe: a batch is taken whole or not at all.)
            taken = async {
                let mut queue = jobs.lock().await;
                queue.recv_many(&mut batch, MAX_BATCH).await
            } => taken,
        };
        if taken == 0 {
            return;
        }
        write(&pool, &mut kept, batch, &stats).await;
        if !keep {
            kept = None;
        }
    }
}

/// Write a batch: its begins first (what new streams wait for before their
/// first token), then its final writes, then the rest — each kind in a
/// statement (or a transaction) of its own, answered as soon as it has
/// committed. Each caller needs only its own write durable, so a begin
/// never waits for the final writes it was queued with.
async fn write(pool: &PgPool, kept: &mut Option<Kept>, batch: Vec<Job>, stats: &Stats) {
    let mut live: Vec<Job> = batch
        .into_iter()
        .filter(|job| job.impatient.as_ref().is_none_or(|s| settle(s, TAKEN)))
        .collect();
    // By kind, then by chat: two batches take the chats' row locks in the
    // same order.
    live.sort_by_key(|job| (job.write.kind(), job.chat));
    while !live.is_empty() {
        let kind = live[0].write.kind();
        let rest = live.iter().position(|job| job.write.kind() != kind);
        let tail = rest.map_or_else(Vec::new, |at| live.split_off(at));
        write_together(pool, kept, live, stats).await;
        live = tail;
    }
}

/// Write `live` (sorted by chat) together and answer each of them.
async fn write_together(pool: &PgPool, kept: &mut Option<Kept>, live: Vec<Job>, stats: &Stats) {
    let impatient = live.iter().any(|job| job.impatient.is_some());
    let mut writes = Vec::with_capacity(live.len());
    let mut replies = Vec::with_capacity(live.len());
    for job in live {
        writes.push(job.write);
        replies.push((job.impatient.is_some(), job.reply));
    }
    let count = writes.len() as u64;
    match run(pool, kept, writes, impatient).await {
        Ok(rows) => {
            stats.transactions.fetch_add(1, Ordering::Relaxed);
            stats.writes.fetch_add(count, Ordering::Relaxed);
            for ((_, reply), rows) in replies.into_iter().zip(rows) {
                let _ = reply.send(Ok(Answer::Done(rows)));
            }
        }
        // No connection in time: a turn that has not begun is refused, a
        // write finishing admitted work waits again, patiently, alone.
        Err(Error::PoolTimedOut) => {
            for (impatient, reply) in replies {
                let _ = reply.send(if impatient {
                    Err(Error::PoolTimedOut)
                } else {
                    Ok(Answer::RunAlone)
                });
            }
        }
        Err(Error::PoolClosed) => {
            for (_, reply) in replies {
                let _ = reply.send(Err(Error::PoolClosed));
            }
        }
        Err(err) => {
            stats.fallbacks.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                writes = count,
                error = %err,
                "a group commit failed and was rolled back; its writes run one by one"
            );
            for (_, reply) in replies {
                let _ = reply.send(Ok(Answer::RunAlone));
            }
        }
    }
}

/// One write on its own, or all of them in one transaction; each write's
/// rows, in the order of `writes`. On the writer's kept connection, or a
/// pooled one that it keeps when the batch succeeds.
async fn run(
    pool: &PgPool,
    kept: &mut Option<Kept>,
    writes: Vec<Write>,
    impatient: bool,
) -> Result<Vec<Vec<PgRow>>, Error> {
    let mut conn = match kept.take() {
        Some(kept) => kept.conn,
        // A batch holding a turn's first write waits for a connection as
        // long as a request may (DB_ACQUIRE_TIMEOUT_MS, the pool's
        // setting); one of final writes only as patiently as a turn's
        // final write does.
        None if impatient => pool.acquire().await?,
        None => patient_acquire(pool, PoolConfig::PATIENT_ACQUIRE).await?,
    };
    // A failed batch drops the connection here (the pool checks it before
    // anyone uses it again); a batch that succeeded keeps it.
    let rows = run_on(&mut conn, writes).await?;
    *kept = Some(Kept {
        conn,
        used: Instant::now(),
    });
    Ok(rows)
}

async fn run_on(
    conn: &mut sqlx::PgConnection,
    writes: Vec<Write>,
) -> Result<Vec<Vec<PgRow>>, Error> {
    if writes.len() == 1 {
        let rows = match writes.into_iter().next() {
            Some(Write::Statement(statement)) => statement.fetch_all(&mut *conn).await?,
            Some(Write::Begin(begin)) => begin.alone().fetch_all(&mut *conn).await?,
            Some(Write::Finish(finish)) => finish.alone(None).fetch_all(&mut *conn).await?,
            None => Vec::new(),
        };
        return Ok(vec![rows]);
    }
    let mut out: Vec<Vec<PgRow>> = std::iter::repeat_with(Vec::new)
        .take(writes.len())
        .collect();
    let mut begins: Vec<(usize, Begin)> = Vec::new();
    let mut finishes: Vec<(usize, Finish)> = Vec::new();
    let mut statements: Vec<(usize, Statement)> = Vec::new();
    for (i, write) in writes.into_iter().enumerate() {
        match write {
            Write::Begin(begin) => begins.push((i, begin)),
            Write::Finish(finish) => finishes.push((i, finish)),
            Write::Statement(statement) => statements.push((i, statement)),
        }
    }
    let order = rounds(&begins);
    // One statement is a transaction of its own; several share one.
    let many = order.len() + usize::from(!finishes.is_empty()) + statements.len() > 1;
    if many {
        let mut tx = conn.begin().await?;
        run_all(&mut tx, begins, order, finishes, statements, &mut out).await?;
        tx.commit().await?;
    } else {
        run_all(conn, begins, order, finishes, statements, &mut out).await?;
    }
    Ok(out)
}

/// Run the statements of a batch on `conn`, the rows of each write into
/// its place in `out`.
async fn run_all(
    conn: &mut sqlx::PgConnection,
    begins: Vec<(usize, Begin)>,
    order: Vec<Vec<usize>>,
    finishes: Vec<(usize, Finish)>,
    statements: Vec<(usize, Statement)>,
    out: &mut [Vec<PgRow>],
) -> Result<(), Error> {
    // Each begin goes into exactly one statement, which takes it over.
    let mut begins: Vec<Option<(usize, Begin)>> = begins.into_iter().map(Some).collect();
    for round in order {
        let taken: Vec<(usize, Begin)> = round.iter().filter_map(|&k| begins[k].take()).collect();
        let Some(new_chat) = taken.first().map(|(_, b)| b.new_chat) else {
            continue;
        };
        let slot: HashMap<Uuid, usize> = taken.iter().map(|(i, b)| (b.chat, *i)).collect();
        let rows = begin_statement(new_chat, taken.into_iter().map(|(_, b)| b))
            .fetch_all(&mut *conn)
            .await?;
        hand_out(rows, "chat_id", &slot, out)?;
    }
    if !finishes.is_empty() {
        let slot: HashMap<Uuid, usize> = finishes.iter().map(|(i, f)| (f.id, *i)).collect();
        let finishes: Vec<Finish> = finishes.into_iter().map(|(_, f)| f).collect();
        let rows = finish_statement(&finishes).fetch_all(&mut *conn).await?;
        hand_out(rows, "id", &slot, out)?;
    }
    for (i, statement) in statements {
        out[i] = statement.fetch_all(&mut *conn).await?;
    }
    Ok(())
}

/// Give each row of a multi-row statement to the write it belongs to: the
/// one whose `key` column's value (`slot`: value → index into `out`) it
/// has — a begin's chat, a final write's message.
fn hand_out(
    rows: Vec<PgRow>,
    key: &str,
    slot: &HashMap<Uuid, usize>,
    out: &mut [Vec<PgRow>],
) -> Result<(), Error> {
    for row in rows {
        // The one row of a begin statement that inserted nothing has no chat.
        let Some(value) = row.try_get::<Option<Uuid>, _>(key)? else {
            continue;
        };
        if let Some(&i) = slot.get(&value)
            && let Some(rows) = out.get_mut(i)
        {
            rows.push(row);
        }
    }
    Ok(())
}

/// The multi-row statements `begins` (sorted by chat) are written in: one
/// per shape (new chat, existing chat), holding each chat once; a chat's
/// further turns go into further statements, in the order they were
/// queued. Indices into `begins`.
fn rounds(begins: &[(usize, Begin)]) -> Vec<Vec<usize>> {
    // (shape, the how-manieth turn of its chat in this batch) → statement
    let mut rounds: Vec<((bool, usize), Vec<usize>)> = Vec::new();
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    for (k, (_, begin)) in begins.iter().enumerate() {
        let nth = seen.entry(begin.chat).or_insert(0);
        let at = (begin.new_chat, *nth);
        *nth += 1;
        match rounds.iter_mut().find(|(r, _)| *r == at) {
            Some((_, round)) => round.push(k),
            None => rounds.push((at, vec![k])),
        }
    }
    rounds.into_iter().map(|(_, round)| round).collect()
}
