//! Sends generated journeys to Kafka (one topic per channel) and writes the ground truth.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use crate::codec::AvroCodec;
use crate::config::Format;
use crate::journeys::{Generated, Journeys, PersonTruth};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("kafka: {0}")]
    Kafka(KafkaError),
    #[error("encoding: {0}")]
    Encode(String),
    #[error("writing truth file: {0}")]
    Io(std::io::Error),
    #[error("no topic configured for channel {0}")]
    NoTopic(String),
    #[error("cannot create topic {0}: {1}")]
    CreateTopic(String, RDKafkaErrorCode),
    #[error(
        "topic(s) {0} do not exist, and the brokers do not create topics on first use: create them \
         first (`kafka-topics.sh --create --topic <name>`)"
    )]
    MissingTopics(String),
    #[error("{failed} of {sent} messages were not delivered; the first: {first}")]
    Undelivered {
        failed: u64,
        sent: u64,
        first: String,
    },
}

error_from!(GenerateError {
    KafkaError => Kafka,
    std::io::Error => Io,
});

/// Where each channel's events go, and in which format.
pub type Routes = HashMap<String, (String, Format)>;

/// A topic `<prefix>-<channel>` for every generated channel, Avro and JSON alternately; and the topic names
/// in channel order. Used by the tests and the benchmark so that both formats are always exercised.
pub fn channel_routes(prefix: &str) -> (Routes, Vec<String>) {
    let mut routes = Routes::new();
    let mut topics = Vec::new();
    for (i, ch) in crate::journeys::CHANNELS.iter().enumerate() {
        let topic = format!("{prefix}-{ch}");
        let format = if i % 2 == 0 {
            Format::Avro
        } else {
            Format::Json
        };
        routes.insert(ch.to_string(), (topic.clone(), format));
        topics.push(topic);
    }
    (routes, topics)
}

/// Creates `names` with `partitions` partitions each (replication 1, for local brokers); fails if one
/// exists already. Blocking: the tests and the benchmark call it from plain threads.
pub fn create_topics(
    brokers: &str,
    names: &[String],
    partitions: i32,
) -> Result<(), GenerateError> {
    create_topics_with(brokers, names, partitions, &[])
}

/// [`create_topics`] with topic settings (`cleanup.policy`, say).
pub fn create_topics_with(
    brokers: &str,
    names: &[String],
    partitions: i32,
    settings: &[(&str, &str)],
) -> Result<(), GenerateError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let new: Vec<NewTopic> = names
        .iter()
        .map(|t| {
            crate::kafka::with_settings(
                NewTopic::new(t, partitions, TopicReplication::Fixed(1)),
                settings,
            )
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for r in rt.block_on(admin.create_topics(&new, &AdminOptions::new()))? {
        r.map_err(|(topic, code)| GenerateError::CreateTopic(topic, code))?;
    }
    Ok(())
}

/// Produces every generated message to `brokers` (no other client settings); `rate` limits messages per
/// second (0: as fast as possible). Returns the number of messages sent.
pub fn send(
    brokers: &str,
    routes: &Routes,
    journeys: &Journeys,
    rate: u64,
) -> Result<u64, GenerateError> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", brokers);
    send_with(client, routes, journeys, rate)
}

/// [`send`] with the client settings given (the service's `[kafka.common]`: SASL and TLS, say).
pub fn send_with(
    mut client: ClientConfig,
    routes: &Routes,
    journeys: &Journeys,
    rate: u64,
) -> Result<u64, GenerateError> {
    let producer: ThreadedProducer<Deliveries> = client
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "lz4")
        .create_with_context(Deliveries::default())?;
    // A record for a topic that does not exist waits in the queue for its metadata, 30 s, and is then
    // dropped: refused here at once, by name, rather than after the wait. Asked topic by topic, as a
    // producer asks, so that a broker that creates topics on first use creates them now.
    let mut topics: Vec<&str> = journeys
        .messages
        .iter()
        .filter_map(|m| routes.get(m.channel()).map(|(topic, _)| topic.as_str()))
        .collect();
    topics.sort_unstable();
    topics.dedup();
    let mut missing = Vec::new();
    for topic in topics {
        let metadata = producer
            .client()
            .fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
        let unknown = metadata.topics().iter().any(|t| {
            t.error()
                == Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
        });
        if unknown {
            missing.push(topic);
        }
    }
    if !missing.is_empty() {
        return Err(GenerateError::MissingTopics(missing.join(", ")));
    }
    let codec = channel_codec()?;
    let started = Instant::now();
    let mut sent = 0u64;
    for m in &journeys.messages {
        let (topic, key, bytes) = encoded(routes, &codec, m)?;
        let mut record = BaseRecord::to(topic).key(key.as_bytes()).payload(&bytes);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        sent += 1;
        if rate > 0 && sent % 100 == 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    producer.flush(Duration::from_secs(60))?;
    let context = producer.context();
    match context.failed.load(Ordering::Acquire) {
        0 => Ok(sent),
        failed => Err(GenerateError::Undelivered {
            failed,
            sent,
            first: context
                .first
                .lock()
                .ok()
                .and_then(|f| f.clone())
                .unwrap_or_default(),
        }),
    }
}

/// How long the generator waits for the brokers' list of topics.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// The generator's producer context: counts the records not delivered and keeps the first one's error,
/// so that a run says whether everything it sent arrived.
#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
    first: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, record)) = result {
            self.failed.fetch_add(1, Ordering::AcqRel);
            if let Ok(mut first) = self.first.lock() {
                first.get_or_insert_with(|| format!("{}: {e}", record.topic()));
            }
        }
    }
}

/// The codec of generated Avro events ([`encoded`]).
pub fn channel_codec() -> Result<AvroCodec, GenerateError> {
    AvroCodec::channel_event().map_err(|e| GenerateError::Encode(e.to_string()))
}

/// A generated message as it goes to Kafka: its channel's topic, its key and its bytes in the channel's
/// format (Avro with schema id 1, or JSON), or the malformed bytes as they are.
pub fn encoded<'a>(
    routes: &'a Routes,
    codec: &AvroCodec,
    m: &'a Generated,
) -> Result<(&'a str, &'a str, Vec<u8>), GenerateError> {
    let (channel, key) = match m {
        Generated::Event { channel, key, .. } | Generated::Malformed { channel, key, .. } => {
            (*channel, key.as_str())
        }
    };
    let (topic, format) = routes
        .get(channel)
        .ok_or_else(|| GenerateError::NoTopic(channel.to_string()))?;
    let bytes = match m {
        Generated::Event { event, .. } => match format {
            Format::Avro => codec
                .encode(1, event)
                .map_err(|e| GenerateError::Encode(e.to_string()))?,
            Format::Json => {
                serde_json::to_vec(event).map_err(|e| GenerateError::Encode(e.to_string()))?
            }
        },
        Generated::Malformed { bytes, .. } => bytes.clone(),
    };
    Ok((topic, key, bytes))
}

/// Writes the truth as JSON lines, one person a line.
pub fn write_truth(path: &Path, truth: &[PersonTruth]) -> Result<(), GenerateError> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for t in truth {
        serde_json::to_writer(&mut f, t).map_err(|e| GenerateError::Encode(e.to_string()))?;
        f.write_all(b"\n")?;
    }
    f.flush()?;
    Ok(())
}

/// Reads a truth file written by [`write_truth`].
pub fn read_truth(path: &Path) -> Result<Vec<PersonTruth>, GenerateError> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| GenerateError::Encode(e.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use rdkafka::mocking::MockCluster;

    use super::*;
    use crate::journeys::{generate, JourneyConfig};

    /// Journeys of `persons` web visitors, each channel's records to `<prefix>-<channel>`.
    fn web_journeys(persons: usize) -> (Routes, Journeys) {
        let (routes, _) = channel_routes("gen");
        let journeys = generate(&JourneyConfig {
            persons,
            channels: vec!["web".into()],
            ..Default::default()
        });
        (routes, journeys)
    }

    /// A broker that creates topics on first use (librdkafka's mock cluster does) gets them created by
    /// the generator's look for them, and every record is delivered.
    #[test]
    fn topics_a_broker_creates_on_first_use_are_not_refused() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let (routes, journeys) = web_journeys(5);
        let sent = send(&cluster.bootstrap_servers(), &routes, &journeys, 0).expect("sent");
        assert_eq!(sent, journeys.messages.len() as u64);
    }

    /// Records the brokers refuse fail the run, counted, with the first one's error: a run that says it
    /// sent its messages delivered them.
    #[test]
    fn records_not_delivered_fail_the_run() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let (routes, journeys) = web_journeys(5);
        cluster.create_topic("gen-web", 1, 1).expect("topic");
        let refused =
            [rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 64];
        cluster.request_errors(rdkafka::types::RDKafkaApiKey::Produce, &refused);
        match send(&cluster.bootstrap_servers(), &routes, &journeys, 0) {
            Err(GenerateError::Undelivered {
                failed,
                sent,
                first,
            }) => {
                assert!(failed > 0 && failed <= sent, "{failed} of {sent}");
                assert!(first.starts_with("gen-web: "), "{first}");
            }
            other => panic!("not refused: {other:?}"),
        }
    }
}
