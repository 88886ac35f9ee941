//! Commits a batch's output and input offsets to Kafka, retrying through broker outages.
//!
//! Exactly-once: one Kafka transaction holds the batch's profile updates, dead letters and the consumer
//! offsets (`send_offsets_to_transaction`), so downstream `read_committed` consumers see all or nothing.
//! At-least-once: the records are flushed, then the offsets committed.

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::ProducerContext;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::call_thread::{CallThread, Hung};
use super::dead_letters;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::{Position, RecordRef};

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("producer fenced or in a fatal state: {0}{}", fatal_hint(.0))]
    Fatal(KafkaError),
    /// The group coordinator no longer knows this consumer (its session expired during a broker outage, or
    /// the group rebalanced). Retrying cannot help until the consumer has polled and rejoined the group.
    #[error("consumer group membership lost, rejoin needed: {0}")]
    Rejoin(KafkaError),
    /// A transactional call kept timing out for longer than the transaction timeout: by then the broker has
    /// aborted the transaction, and this producer is not getting through to its coordinator (seen after a
    /// coordinator restart). Only a new producer helps.
    #[error("transactional producer stuck: {0}")]
    Stuck(KafkaError),
    /// A transactional call did not return at all (librdkafka#5456): it was left behind with its
    /// producer, and only a new producer helps.
    #[error("transactional producer hung: {0}")]
    Hung(Hung),
    #[error("could not commit before the deadline: {0}")]
    Deadline(KafkaError),
    /// Told to stop while transactions were not initialised yet (the coordinator unreachable): nothing
    /// was opened, so nothing is left to finish.
    #[error("stopped before the transactional producer was initialised")]
    Stopped,
    #[error("kafka client: {0}")]
    Client(KafkaError),
}

error_from!(CommitError {
    KafkaError => Client,
});

/// Per-call timeout of the transactional API; a call that times out is retried.
const TXN_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a transactional call is waited for before it is left behind: its own timeout and then some.
const CALL_BOUND: Duration = Duration::from_secs(TXN_CALL_TIMEOUT.as_secs() + 10);

/// A hang on demand, in test builds only (feature `kafka-it`): librdkafka's own (#5456) cannot be caused
/// against a real broker. `STITCHER_TEST_HANG=<call>:<n>` makes the n-th call of that name in the process
/// (counted from 1) block for ever once librdkafka returned from it, so that its outcome is unknown to the
/// caller (a `commit_transaction` that committed, an offsets call whose offsets are in the transaction);
/// `STITCHER_TEST_CALL_BOUND_MS` sets how long a call is waited for. `STITCHER_TEST_ABORT_AS_COMMIT=<n>`
/// makes the n-th commit abort its transaction and report it committed: what the pipeline sees when the
/// coordinator completed a commit without its markers and a later abort took the records (docs/DESIGN.md,
/// "Restore").
#[cfg(feature = "kafka-it")]
mod hang_on_demand {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    static CALLS: AtomicUsize = AtomicUsize::new(0);
    static COMMITS: AtomicUsize = AtomicUsize::new(0);

    /// Whether this commit is the one to abort while reporting it committed.
    pub fn abort_as_commit() -> bool {
        let Some(n) = std::env::var("STITCHER_TEST_ABORT_AS_COMMIT")
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
        else {
            return false;
        };
        COMMITS.fetch_add(1, Ordering::AcqRel) + 1 == n
    }

    pub fn bound(default: Duration) -> Duration {
        std::env::var("STITCHER_TEST_CALL_BOUND_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map_or(default, Duration::from_millis)
    }

    /// Whether this call of `call` is the one to hang after.
    pub fn due(call: &str) -> bool {
        let Ok(spec) = std::env::var("STITCHER_TEST_HANG") else {
            return false;
        };
        let Some((name, n)) = spec.split_once(':') else {
            return false;
        };
        name == call && n.parse::<usize>().ok() == Some(CALLS.fetch_add(1, Ordering::AcqRel) + 1)
    }

    pub fn forever() -> ! {
        loop {
            std::thread::park();
        }
    }
}

fn call_bound() -> Duration {
    #[cfg(feature = "kafka-it")]
    return hang_on_demand::bound(CALL_BOUND);
    #[cfg(not(feature = "kafka-it"))]
    CALL_BOUND
}
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long one `init_transactions` call waits before a stop is looked for; calling it again resumes the
/// initialisation under way.
const INIT_TURN: Duration = Duration::from_secs(1);
/// How long a wait for the transaction coordinator goes unlogged: after a crash, the coordinator ends the
/// crashed producer's transaction first, which takes a few seconds.
const INIT_WAIT_QUIET: Duration = Duration::from_secs(5);
/// How often a longer wait for the transaction coordinator is logged.
const INIT_WAIT_LOG: Duration = Duration::from_secs(10);

/// A wait for the transaction coordinator, in turns of at least [`INIT_TURN`] (a turn that failed at
/// once is waited out, not repeated at once), logged once it passed [`INIT_WAIT_QUIET`] and every
/// [`INIT_WAIT_LOG`] after.
struct InitWait {
    since: Instant,
    logged: Option<Instant>,
}

impl InitWait {
    fn new() -> Self {
        Self {
            since: Instant::now(),
            logged: None,
        }
    }

    fn failed_turn(&mut self, turn: Instant, e: &KafkaError) {
        let logged_long_ago = self.logged.is_none_or(|at| at.elapsed() >= INIT_WAIT_LOG);
        if self.since.elapsed() >= INIT_WAIT_QUIET && logged_long_ago {
            self.logged = Some(Instant::now());
            tracing::warn!(error = %e, waited_s = self.since.elapsed().as_secs(),
                "transactions not initialised yet (the transaction coordinator unreachable, or still ending an earlier producer's transaction), waiting");
        }
        std::thread::sleep(INIT_TURN.saturating_sub(turn.elapsed()));
    }
}

/// How long a record waits for room in the producer's queue before the wait is logged.
const QUEUE_FULL_WARN_AFTER: Duration = Duration::from_secs(10);

/// When to stop retrying: never while running (a broker outage is waited out), `drain` after shutdown
/// was requested.
pub struct Deadline {
    shutdown: CancellationToken,
    drain: Duration,
    drain_started: Cell<Option<Instant>>,
}

impl Deadline {
    pub fn new(shutdown: CancellationToken, drain: Duration) -> Self {
        Self {
            shutdown,
            drain,
            drain_started: Cell::new(None),
        }
    }

    /// Whether the service was told to stop.
    pub fn stopping(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Would waiting `wait` more overrun the deadline?
    pub fn passed_after(&self, wait: Duration) -> bool {
        if !self.shutdown.is_cancelled() {
            return false;
        }
        let started = self.drain_started.get().unwrap_or_else(|| {
            let now = Instant::now();
            self.drain_started.set(Some(now));
            now
        });
        Instant::now() + wait > started + self.drain
    }
}

/// The producer's context: logs client errors and, for one watched topic, remembers the highest offset
/// delivered per partition (scale-out mode keeps its changelog positions this way).
pub struct CommitContext {
    watch: Option<String>,
    delivered: std::sync::Mutex<std::collections::BTreeMap<i32, i64>>,
}

impl ClientContext for CommitContext {
    fn error(&self, error: KafkaError, reason: &str) {
        super::log_client_error(&error, reason);
    }
}

impl ProducerContext for CommitContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let (Some(watch), Ok(m)) = (&self.watch, result) else {
            return;
        };
        if m.topic() == watch {
            if let Ok(mut d) = self.delivered.lock() {
                let max = d.entry(m.partition()).or_insert(m.offset());
                *max = (*max).max(m.offset());
            }
        }
    }
}

type TxnProducer = ThreadedProducer<CommitContext>;

/// What a transaction's steps fail with: the client's error, or a call that did not return.
#[derive(Debug, thiserror::Error)]
enum TxnError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Hung(Hung),
}

pub struct Committer {
    /// The producer; its blocking transactional calls run on its own thread (see [`CallThread`]).
    producer: CallThread<TxnProducer>,
    /// The timeout each transactional call is given.
    call_timeout: Duration,
    metrics: Metrics,
    /// A failed transaction must be aborted before the next one begins.
    needs_abort: bool,
    /// How long a timed-out `commit_transaction` is retried as it is (the transaction timeout).
    stuck_after: Duration,
    /// Where a record that cannot be produced goes instead (see [`dead_letters::unproducible`]).
    dlq_topic: String,
    /// Largest record sent; lowered when the broker refuses a record for its size.
    max_record_bytes: usize,
}

/// Times the steps of one transaction (`stitcher_commit_step_seconds`): each step from the end of the one
/// before.
struct StepTimer {
    steps: prometheus::HistogramVec,
    since: Instant,
}

impl StepTimer {
    fn new(metrics: &Metrics) -> Self {
        Self {
            steps: metrics.commit_steps.clone(),
            since: Instant::now(),
        }
    }

    fn done(&mut self, step: &str) {
        let now = Instant::now();
        self.steps
            .with_label_values(&[step])
            .observe(now.duration_since(self.since).as_secs_f64());
        self.since = now;
    }
}

/// An error about a record rather than about the infrastructure: retrying the same record cannot help.
fn is_record_error(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::MessageBatchTooLarge
        )
    ) || e.to_string().contains("too large")
}

/// What to change for a fatal producer error that a setting causes: fenced, another process initialised
/// transactions with the same transactional id; a transaction timeout the broker refuses, a setting here.
fn fatal_hint(e: &KafkaError) -> &'static str {
    let code = e.rdkafka_error_code();
    let text = e.to_string().to_lowercase();
    if matches!(code, Some(RDKafkaErrorCode::InvalidTransactionTimeout))
        || text.contains("transaction timeout is larger")
    {
        " (processing.transaction_timeout is longer than the broker's transaction.max.timeout.ms \
         allows, 15 minutes by default: lower it)"
    } else if matches!(
        code,
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    ) || text.contains("fenced")
    {
        " (another process started with this transactional id, kafka.transactional_id and \
         kafka.instance_id: every instance needs a kafka.instance_id of its own)"
    } else {
        ""
    }
}

fn is_fatal(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(rd) => rd.is_fatal(),
        _ => matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Fatal
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
            )
        ),
    }
}

/// Offsets rejected because the group metadata they carry is stale: the batch's consumer has rejoined
/// since (a new member id, a new generation; with static membership the coordinator answers that the
/// instance is fenced by its own newer member). Retrying with the same metadata cannot succeed.
fn needs_rejoin(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::FencedInstanceId
        )
    )
}

fn is_retriable(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(rd) if rd.is_retriable())
}

impl Committer {
    /// Creates the producer; under exactly-once, initialises transactions, which fences any older instance
    /// with the same transactional id and aborts its open transaction.
    pub fn new(
        cfg: &Config,
        instance: &str,
        metrics: Metrics,
        deadline: &Deadline,
    ) -> Result<Self, CommitError> {
        Self::watching(cfg, instance, metrics, deadline, None)
    }

    /// Like [`Committer::new`]; remembers the offsets delivered to `watch` (see [`Committer::take_delivered`]).
    pub fn watching(
        cfg: &Config,
        instance: &str,
        metrics: Metrics,
        deadline: &Deadline,
        watch: Option<&str>,
    ) -> Result<Self, CommitError> {
        let start = || -> Result<CallThread<TxnProducer>, CommitError> {
            let context = CommitContext {
                watch: watch.map(str::to_string),
                delivered: Default::default(),
            };
            let producer: TxnProducer =
                super::producer_config(cfg, instance).create_with_context(context)?;
            CallThread::start("stitcher-txn", producer, call_bound(), &metrics.health).map_err(
                |e| {
                    CommitError::Client(KafkaError::ClientCreation(format!(
                        "no thread for the producer's calls: {e}"
                    )))
                },
            )
        };
        let mut producer = start()?;
        let mut backoff = Duration::from_millis(200);
        let mut waiting = InitWait::new();
        loop {
            let turn = Instant::now();
            let init = producer.call("init_transactions", |p| p.init_transactions(INIT_TURN));
            match init {
                Ok(Ok(())) => break,
                Ok(Err(e)) if is_fatal(&e) => return Err(CommitError::Fatal(e)),
                // A turn that timed out (the coordinator not found or not loaded yet): the next call
                // resumes the initialisation under way in the background.
                Ok(Err(e)) if is_retriable(&e) => waiting.failed_turn(turn, &e),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "init_transactions failed, retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(hung) => {
                    metrics.errors.with_label_values(&["hung"]).inc();
                    if !deadline.stopping() {
                        tracing::error!(error = %hung, "starting another producer");
                        producer = start()?;
                    }
                }
            }
            // No transaction is open yet, so nothing is left to finish: a stop ends the wait at once.
            if deadline.stopping() {
                return Err(CommitError::Stopped);
            }
        }
        Ok(Self {
            producer,
            call_timeout: TXN_CALL_TIMEOUT,
            metrics,
            needs_abort: false,
            stuck_after: cfg.processing.transaction_timeout,
            dlq_topic: cfg.output.dead_letter_topic.clone(),
            max_record_bytes: cfg.output.max_record_bytes,
        })
    }

    /// Commits `records` and `positions` as one unit, retrying transient failures (a broker outage) until
    /// `deadline`. The offsets are committed with `group`, the consumer's group metadata when the batch
    /// closed: if the group rebalanced since, the coordinator refuses them.
    pub fn commit(
        &mut self,
        records: &[RecordRef<'_>],
        positions: &[Position],
        group: Option<&Arc<ConsumerGroupMetadata>>,
        deadline: &Deadline,
    ) -> Result<(), CommitError> {
        let mut tpl = TopicPartitionList::new();
        for p in positions {
            tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(p.next_offset))?;
        }
        let mut backoff = Duration::from_millis(100);
        let started = Instant::now();
        self.metrics.health.commit_started();
        loop {
            let attempt = self.transaction(records, &tpl, group, deadline);
            let e = match attempt {
                Ok(()) => {
                    self.metrics.health.commit_settled();
                    self.metrics
                        .transactions
                        .with_label_values(&["committed"])
                        .inc();
                    self.metrics
                        .commit_duration
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(());
                }
                Err(TxnError::Hung(hung)) => {
                    // Its transaction is settled by the producer that takes over (docs/DESIGN.md).
                    tracing::error!(error = %hung, "a transactional call never returned; a new producer is needed");
                    self.metrics.health.commit_failed(&hung);
                    self.metrics.errors.with_label_values(&["hung"]).inc();
                    return Err(CommitError::Hung(hung));
                }
                Err(TxnError::Kafka(e)) => e,
            };
            self.metrics.health.commit_failed(&e);
            match e {
                e if is_fatal(&e) => {
                    return Err(CommitError::Fatal(e));
                }
                e if needs_rejoin(&e) => {
                    // Aborted now, not when the next transaction begins: its records hold the changelog's
                    // last stable offset, and the restore after the rejoin reads up to it (left open, the
                    // restore waited for the transaction timeout; the group test caught it).
                    let timeout = self.call_timeout;
                    match self.call("abort_transaction", move |p| p.abort_transaction(timeout)) {
                        Ok(()) => self.needs_abort = false,
                        Err(abort) => {
                            tracing::warn!(error = %abort, "abort after a refused commit failed; aborting before the next one")
                        }
                    }
                    self.metrics.errors.with_label_values(&["commit"]).inc();
                    self.metrics
                        .transactions
                        .with_label_values(&["aborted"])
                        .inc();
                    return Err(CommitError::Rejoin(e));
                }
                // The transactional calls already waited their own timeout; retrying in place did not help.
                e if is_retriable(&e) => {
                    self.metrics.errors.with_label_values(&["commit"]).inc();
                    return Err(CommitError::Stuck(e));
                }
                e => {
                    self.metrics.errors.with_label_values(&["commit"]).inc();
                    self.metrics
                        .transactions
                        .with_label_values(&["aborted"])
                        .inc();
                    if is_record_error(&e) {
                        // The broker refused a record for its size (a topic limit lowered since start-up):
                        // from now on the largest record of this batch is too large, and the next attempt
                        // sends a dead letter in its place.
                        let largest = records
                            .iter()
                            .copied()
                            .map(dead_letters::record_bytes)
                            .max();
                        self.max_record_bytes = largest
                            .map_or(self.max_record_bytes, |l| l.saturating_sub(1))
                            .clamp(16 * 1024, self.max_record_bytes);
                        tracing::error!(error = %e, max_record_bytes = self.max_record_bytes,
                            "a record was refused for its size; lowering the record limit");
                    }
                    if deadline.passed_after(backoff) {
                        return Err(CommitError::Deadline(e));
                    }
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "commit failed, retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Per partition of the watched topic, the offset after the last record delivered since the last call.
    /// After a committed transaction, that is where the partition stands with this producer's records in.
    pub fn take_delivered(&self) -> std::collections::BTreeMap<i32, i64> {
        self.producer
            .client()
            .context()
            .delivered
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default()
            .into_iter()
            .map(|(p, last)| (p, last + 1))
            .collect()
    }

    fn transaction(
        &mut self,
        records: &[RecordRef<'_>],
        tpl: &TopicPartitionList,
        group: Option<&Arc<ConsumerGroupMetadata>>,
        deadline: &Deadline,
    ) -> Result<(), TxnError> {
        let timeout = self.call_timeout;
        if self.needs_abort {
            self.call("abort_transaction", move |p| p.abort_transaction(timeout))?;
            self.needs_abort = false;
        }
        let mut step = StepTimer::new(&self.metrics);
        self.producer.client().begin_transaction()?;
        self.needs_abort = true;
        self.send_all(records, deadline)?;
        step.done("produce");
        if tpl.count() > 0 {
            let group = Arc::clone(
                group.ok_or(KafkaError::ConsumerCommit(RDKafkaErrorCode::UnknownGroup))?,
            );
            let tpl = tpl.clone();
            self.call("send_offsets_to_transaction", move |p| {
                p.send_offsets_to_transaction(&tpl, &group, timeout)
            })?;
        }
        step.done("offsets");
        super::await_deliveries(self.producer.client(), timeout)?;
        step.done("deliveries");
        let committing = Instant::now();
        loop {
            #[cfg(feature = "kafka-it")]
            if hang_on_demand::abort_as_commit() {
                self.call("abort_transaction", move |p| p.abort_transaction(timeout))?;
                break;
            }
            match self.call("commit_transaction", move |p| p.commit_transaction(timeout)) {
                Ok(()) => break,
                // A commit that timed out may be retried as it is, up to the transaction timeout.
                Err(TxnError::Kafka(e))
                    if is_retriable(&e)
                        && !deadline.passed_after(Duration::ZERO)
                        && committing.elapsed() < self.stuck_after =>
                {
                    tracing::warn!(error = %e, "commit_transaction timed out, retrying");
                }
                Err(e) => return Err(e),
            }
        }
        self.needs_abort = false;
        step.done("end");
        Ok(())
    }

    /// A blocking transactional call of the producer, on the producer's thread (see [`CallThread`]).
    fn call<T: Send + 'static>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(&TxnProducer) -> Result<T, KafkaError> + Send + 'static,
    ) -> Result<T, TxnError> {
        #[cfg(feature = "kafka-it")]
        let f = move |p: &TxnProducer| {
            let due = hang_on_demand::due(call);
            let r = f(p);
            if due {
                hang_on_demand::forever();
            }
            r
        };
        match self.producer.call(call, f) {
            Ok(result) => Ok(result?),
            Err(hung) => Err(TxnError::Hung(hung)),
        }
    }

    fn send_all(&self, records: &[RecordRef<'_>], deadline: &Deadline) -> Result<(), KafkaError> {
        for &r in records {
            if !dead_letters::fits(r, self.max_record_bytes) {
                let error = format!(
                    "record of {} bytes for {} exceeds the record limit of {} bytes",
                    dead_letters::record_bytes(r),
                    r.topic,
                    self.max_record_bytes
                );
                self.send_unproducible(r, &error, deadline)?;
                continue;
            }
            match self.send(r, deadline) {
                Err(e) if is_record_error(&e) => self.send_unproducible(
                    r,
                    &format!("producer refused the record: {e}"),
                    deadline,
                )?,
                other => other?,
            }
        }
        Ok(())
    }

    /// Sends the dead letter standing in for `r`, which cannot be produced.
    fn send_unproducible(
        &self,
        r: RecordRef<'_>,
        error: &str,
        deadline: &Deadline,
    ) -> Result<(), KafkaError> {
        tracing::error!(
            topic = r.topic,
            error,
            "record cannot be produced; sending a dead letter in its place"
        );
        self.metrics
            .dead_letters
            .with_label_values(&["output"])
            .inc();
        let letter = dead_letters::unproducible(&self.dlq_topic, r, error, self.max_record_bytes);
        self.send(letter.borrowed(), deadline)
    }

    fn send(&self, r: RecordRef<'_>, deadline: &Deadline) -> Result<(), KafkaError> {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(r.topic);
        // Most records have none: librdkafka's header list is made only for those that do.
        if !r.headers.is_empty() {
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
            for (k, v) in r.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            record = record.headers(headers);
        }
        if let Some(p) = r.partition {
            record = record.partition(p);
        }
        if let Some(k) = r.key {
            record = record.key(k);
        }
        if let Some(p) = r.payload {
            record = record.payload(p);
        }
        let mut pending = record;
        let mut full_since: Option<Instant> = None;
        let mut warned = false;
        loop {
            match self.producer.client().send(pending) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    if deadline.passed_after(Duration::ZERO) {
                        return Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull));
                    }
                    let since = *full_since.get_or_insert_with(Instant::now);
                    if !warned && since.elapsed() > QUEUE_FULL_WARN_AFTER {
                        // Waited out while running, as a broker outage is; said once, so that a stall
                        // here is in the log.
                        tracing::warn!(
                            topic = r.topic,
                            secs = since.elapsed().as_secs(),
                            "the producer's queue has stayed full; still waiting for deliveries"
                        );
                        warned = true;
                    }
                    pending = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::{MockCluster, MockCoordinator};

    use super::*;

    /// A fatal error a setting causes names the setting to change.
    #[test]
    fn fatal_errors_name_the_setting_to_change() {
        let timeout = CommitError::Fatal(KafkaError::Global(
            RDKafkaErrorCode::InvalidTransactionTimeout,
        ));
        assert!(
            timeout
                .to_string()
                .contains("processing.transaction_timeout"),
            "{timeout}"
        );
        let fenced = CommitError::Fatal(KafkaError::Global(RDKafkaErrorCode::ProducerFenced));
        assert!(fenced.to_string().contains("kafka.instance_id"), "{fenced}");
        let other = CommitError::Fatal(KafkaError::Global(RDKafkaErrorCode::Fatal));
        let said = other.to_string();
        assert!(
            !said.contains("kafka.instance_id") && !said.contains("processing."),
            "{said}"
        );
    }

    /// Transactions initialised while the transaction coordinator is down: the producer waits in turns
    /// and resumes the initialisation once the coordinator is back; a stop during the wait ends it at
    /// once (nothing was opened, so there is nothing to drain), not after the drain timeout.
    #[test]
    fn initialising_transactions_waits_for_the_coordinator_and_a_stop_ends_the_wait_at_once() {
        let cluster = MockCluster::new(2).expect("mock cluster");
        let mut cfg = Config::default();
        cfg.kafka.brokers = cluster.bootstrap_servers();
        cfg.kafka.transactional_id = "init".into();
        cluster
            .coordinator(MockCoordinator::Transaction("init-0".into()), 2)
            .expect("transaction coordinator");
        let metrics = Metrics::new().expect("metrics");

        // Initialises a producer on a thread of its own, with `deadline`: whether it did, and when.
        let init = |cfg: &Config, deadline: Deadline| {
            let (cfg, metrics) = (cfg.clone(), metrics.clone());
            std::thread::spawn(move || {
                let r = Committer::new(&cfg, "0", metrics, &deadline).map(drop);
                (r, Instant::now())
            })
        };

        // The coordinator comes back during the wait: the initialisation resumes and completes.
        cluster.broker_down(2).expect("coordinator down");
        let started = Instant::now();
        let waiting = init(
            &cfg,
            Deadline::new(CancellationToken::new(), Duration::from_secs(30)),
        );
        std::thread::sleep(Duration::from_millis(2_500));
        assert!(
            !waiting.is_finished(),
            "initialised without its coordinator"
        );
        cluster.broker_up(2).expect("coordinator up");
        let (back, at) = waiting.join().expect("init thread");
        assert!(back.is_ok(), "{:?}", back.err());
        assert!(at - started < Duration::from_secs(15), "{:?}", at - started);

        // Told to stop during the wait: it ends within a turn, with `Stopped`.
        cfg.kafka.transactional_id = "init-stopped".into();
        cluster
            .coordinator(MockCoordinator::Transaction("init-stopped-0".into()), 2)
            .expect("transaction coordinator");
        cluster.broker_down(2).expect("coordinator down");
        let shutdown = CancellationToken::new();
        let waiting = init(
            &cfg,
            Deadline::new(shutdown.clone(), Duration::from_secs(30)),
        );
        std::thread::sleep(Duration::from_millis(2_500));
        assert!(
            !waiting.is_finished(),
            "initialised without its coordinator"
        );
        let stop_at = Instant::now();
        shutdown.cancel();
        let (stopped, at) = waiting.join().expect("init thread");
        let after_stop = at - stop_at;
        assert!(
            matches!(stopped, Err(CommitError::Stopped)),
            "{:?}",
            stopped.err()
        );
        assert!(after_stop < Duration::from_secs(2), "{after_stop:?}");
    }

    /// librdkafka#5456: with the group coordinator down, `send_offsets_to_transaction` does not return,
    /// whatever its timeout. The commit comes back hung at the bound instead of blocking its thread for
    /// ever; a new producer with the same `transactional.id` then commits once the coordinator is back, and
    /// the producer left behind is closed when its call returns at last.
    #[test]
    fn a_commit_whose_offsets_call_never_returns_comes_back_hung_at_its_bound() {
        let cluster = MockCluster::new(3).expect("mock cluster");
        cluster.create_topic("in", 1, 1).expect("topic");
        cluster.create_topic("out", 1, 1).expect("topic");
        let mut cfg = Config::default();
        cfg.kafka.brokers = cluster.bootstrap_servers();
        cfg.kafka.transactional_id = "hung".into();
        cfg.kafka.group_id = "hung-group".into();
        cluster
            .coordinator(MockCoordinator::Transaction("hung-0".into()), 1)
            .expect("transaction coordinator");
        cluster
            .coordinator(MockCoordinator::Group("hung-group".into()), 2)
            .expect("group coordinator");
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "hung-group")
            .create()
            .expect("consumer");
        let group = Arc::new(consumer.group_metadata().expect("group metadata"));
        let metrics = Metrics::new().expect("metrics");
        let deadline = Deadline::new(CancellationToken::new(), Duration::from_secs(20));
        let position = Position {
            topic: "in".into(),
            partition: 0,
            next_offset: 1,
        };
        let record = crate::store::OutRecord {
            topic: "out".into(),
            partition: Some(0),
            key: Some(b"k".to_vec()),
            payload: Some(b"v".to_vec()),
            headers: Vec::new(),
        };
        let records = [record.borrowed()];

        let mut first =
            Committer::new(&cfg, "0", metrics.clone(), &deadline).expect("first producer");
        first.call_timeout = Duration::from_secs(1);
        first.producer.bound = Duration::from_secs(3);
        cluster.broker_down(2).expect("group coordinator down");
        let started = Instant::now();
        let hung = first.commit(
            &records,
            std::slice::from_ref(&position),
            Some(&group),
            &deadline,
        );
        let took = started.elapsed();
        match &hung {
            Err(CommitError::Hung(h)) => assert_eq!(h.call, "send_offsets_to_transaction"),
            other => panic!("not hung: {other:?}"),
        }
        assert!(
            took >= Duration::from_secs(3) && took < Duration::from_secs(8),
            "{took:?}"
        );
        assert_eq!(metrics.health.left_behind(), 1);
        assert_eq!(metrics.health.live(), Ok(()));

        cluster.broker_up(2).expect("group coordinator up");
        let mut second =
            Committer::new(&cfg, "0", metrics.clone(), &deadline).expect("second producer");
        second
            .commit(&records, &[position], Some(&group), &deadline)
            .expect("the producer that took over commits");
        drop(first);
        let until = Instant::now() + Duration::from_secs(30);
        while metrics.health.left_behind() > 0 {
            assert!(
                Instant::now() < until,
                "the call left behind never returned"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
