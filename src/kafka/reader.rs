//! Reading a whole topic from outside the pipeline, as a `read_committed` consumer sees it: for the quality
//! report and the integration tests.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("kafka: {0}")]
    Kafka(KafkaError),
    #[error("topic {0} not found")]
    NoTopic(String),
    #[error("reading {0} did not reach the end in {1:?}")]
    Timeout(String, Duration),
}

error_from!(ReadError {
    KafkaError => Kafka,
});

/// One committed record.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// `None` for a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Header values as (lossy) UTF-8.
    pub headers: HashMap<String, String>,
}

/// End of partition is how the reader knows it is done, not an error worth a log line.
pub(crate) struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_))
            && error.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        {
            super::log_client_error(&error, reason);
        }
    }
}

impl ConsumerContext for QuietEof {}

/// Every committed record of `topic`, in order within each partition, read from the beginning to the end
/// offsets of the moment.
pub fn read_committed(
    brokers: &str,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<Record>, ReadError> {
    let mut base = ClientConfig::new();
    base.set("bootstrap.servers", brokers);
    read_committed_with(base, topic, timeout)
}

/// A `read_committed` consumer outside any group that matters (a random group id; it commits nothing), with
/// the client settings of `base`, for partitions it assigns itself.
pub(crate) fn outside_consumer(
    base: &mut ClientConfig,
    purpose: &str,
) -> Result<BaseConsumer<QuietEof>, KafkaError> {
    base.set(
        "group.id",
        format!(
            "stitcher-{purpose}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ),
    )
    .set("isolation.level", "read_committed")
    .set("enable.auto.commit", "false")
    .create_with_context(QuietEof)
}

/// [`read_committed`] with the client settings of `base` (brokers and security).
pub fn read_committed_with(
    base: ClientConfig,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<Record>, ReadError> {
    let mut out = Vec::new();
    for_each_committed(base, topic, timeout, |m| {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|x| {
                        let value = String::from_utf8_lossy(x.value.unwrap_or_default());
                        (x.key.to_string(), value.into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(Record {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
        });
    })?;
    Ok(out)
}

/// Calls `f` with every committed record of `topic` as the consumer holds it (nothing copied), in order
/// within each partition, from the beginning to the end offsets of the moment.
pub fn for_each_committed(
    mut base: ClientConfig,
    topic: &str,
    timeout: Duration,
    mut f: impl FnMut(&BorrowedMessage<'_>),
) -> Result<(), ReadError> {
    let consumer = outside_consumer(base.set("enable.partition.eof", "true"), "reader")?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = md
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(ReadError::NoTopic(topic.to_string()));
    }
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut at_eof = BTreeSet::new();
    let deadline = Instant::now() + timeout;
    while at_eof.len() < partitions.len() {
        if Instant::now() >= deadline {
            return Err(ReadError::Timeout(topic.to_string(), timeout));
        }
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_eof.insert(p);
            }
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => {
                at_eof.remove(&m.partition());
                f(&m);
            }
        }
    }
    Ok(())
}
