//! Configuration: documented structs, unknown keys refused, validated once at start-up.
//!
//! Precedence, lowest first: built-in defaults < the TOML file (`--config`) < `STITCHER_*` environment
//! variables < command-line flags. See README.md "Configuration" for every key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::mapping::{FieldMapping, Mapping, Preset};
use crate::codec::{Layout, Writer};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The cause is printed in the message and not a `source` (a field of that name would be one): every
    // report of the chain printed it twice (see `error_from!`).
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid config file {path}: {error}")]
    Parse {
        path: PathBuf,
        error: toml::de::Error,
    },
    #[error("invalid environment variable {name}: {reason}")]
    Env { name: String, reason: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    /// Channel topics to consume; one `[[inputs]]` table each.
    pub inputs: Vec<InputConfig>,
    pub output: OutputConfig,
    pub identity: IdentityConfig,
    pub guardrails: GuardrailConfig,
    pub state: StateConfig,
    pub processing: ProcessingConfig,
    pub http: HttpConfig,
    pub control: ControlConfig,
    /// The merge-storm breaker (README "Merge storms"); off by default.
    pub breaker: crate::breaker::BreakerConfig,
    pub scaleout: ScaleoutConfig,
    pub limits: LimitsConfig,
    pub registry: RegistryConfig,
    /// What profiles tell every channel beyond the fixed fields: bounds and computed traits.
    pub enrichment: crate::profile::Enrichment,
}

/// A Confluent-compatible Schema Registry (README "Schema Registry"). With `url` set, the output schema is
/// registered under `<output.topic>-value` at start-up and its id written in every record (instead of
/// `output.schema_id`), and Avro inputs read through `preset` or `fields` without a `schema_file` get
/// their writer schema by the id in each message.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Base URL of the Confluent REST API (`https://registry:8081`; Apicurio: `.../apis/ccompat/v7`).
    /// Empty: no registry.
    pub url: String,
    /// Basic auth (`STITCHER_REGISTRY_USERNAME`); none when empty.
    pub username: String,
    /// Basic auth (`STITCHER_REGISTRY_PASSWORD`; better from the environment than in a file).
    #[serde(skip_serializing)]
    pub password: String,
    /// PEM certificates to trust besides the public roots, for an `https://` registry behind a private
    /// CA.
    pub ca_file: Option<PathBuf>,
    /// Time for one request.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long an unknown schema id is asked for while the registry is unreachable before the batch
    /// fails (and the service exits to be restarted); known ids never ask.
    #[serde(with = "humantime_serde")]
    pub patience: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            username: String::new(),
            password: String::new(),
            ca_file: None,
            timeout: Duration::from_secs(10),
            patience: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .field("patience", &self.patience)
            .finish()
    }
}

impl RegistryConfig {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }
}

/// Plausible ranges for the values an event carries. An event with a value outside them goes to the
/// dead-letter topic with a `dlq.error` naming the field; nothing it carries can overflow a sum or a
/// timestamp downstream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest purchase amount or unit price, in major units (a refund may be as negative).
    pub max_amount: f64,
    /// Largest quantity of one cart or order line (at least 1).
    pub max_quantity: i32,
    /// Earliest accepted event time.
    #[serde(with = "humantime_serde")]
    pub min_event_time: std::time::SystemTime,
    /// How far ahead of this machine's clock an event time may be.
    #[serde(with = "humantime_serde")]
    pub max_future: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_amount: 1e9,
            max_quantity: 10_000,
            // 2000-01-01T00:00:00Z
            min_event_time: std::time::UNIX_EPOCH + Duration::from_secs(946_684_800),
            max_future: Duration::from_secs(24 * 3600),
        }
    }
}

impl LimitsConfig {
    /// The earliest accepted event time, in epoch milliseconds.
    pub fn min_event_millis(&self) -> i64 {
        self.min_event_time
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// The graph's shards, shared by the instances of one consumer group (docs/DESIGN.md, "Scale-out"); one
/// instance holds them all when it is alone.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScaleoutConfig {
    /// Shards of the graph: partitions of `topic` and of its changelog. Identifiers are placed by hash
    /// modulo this number, so it is fixed for the life of a deployment's state.
    pub shards: u32,
    /// Internal topic of the messages between shards; the changelog is `<topic>-changelog`.
    pub topic: String,
}

impl Default for ScaleoutConfig {
    fn default() -> Self {
        Self {
            shards: 1,
            topic: String::new(),
        }
    }
}

impl ScaleoutConfig {
    pub fn enabled(&self) -> bool {
        self.shards > 0
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Topic of erase and unlink commands (JSON, see README.md "Erasure and unmerge"), consumed in the same
    /// transactions as the channel topics. Empty: no control topic.
    pub topic: String,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            topic: "stitcher-control".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group; instances with the same group share the partitions.
    pub group_id: String,
    /// Prefix of the transactional id; the instance's id is appended. Must be stable across restarts of the
    /// same instance so that a restarted instance fences its zombie.
    pub transactional_id: String,
    /// This instance's name, appended to the transactional id. Stable per instance (a StatefulSet pod name).
    pub instance_id: String,
    /// Any librdkafka setting, applied to consumer and producer (security.protocol, sasl.*, ssl.*, ...).
    pub common: BTreeMap<String, String>,
    /// librdkafka settings for the consumer only.
    pub consumer: BTreeMap<String, String>,
    /// librdkafka settings for the producer only.
    pub producer: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_id: "stitcher".into(),
            transactional_id: "stitcher".into(),
            instance_id: "0".into(),
            common: BTreeMap::new(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Avro in the Confluent wire format (magic byte 0, 4-byte schema id, Avro binary).
    Avro,
    /// One JSON object per message, the same fields as schemas/channel_event.avsc.
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    pub topic: String,
    /// Channel name recorded for events of this topic (web, app, email, pos, callcenter, social, ...).
    pub channel: String,
    /// `avro` or `json`; JSON when a preset other than `stitcher` or `fields` is given, Avro otherwise.
    #[serde(default)]
    pub format: Option<Format>,
    /// The layout of the events: `stitcher` (the service's own schema, the default) or `segment` (the
    /// Segment/RudderStack spec).
    #[serde(default)]
    pub preset: Preset,
    /// Field paths for events in the team's own shape, instead of a preset (README "Bring your own
    /// events").
    #[serde(default)]
    pub fields: Option<FieldMapping>,
    /// For Avro in the team's own schema (with `preset` or `fields`): the writer schema (`.avsc`)...
    #[serde(default)]
    pub schema_file: Option<PathBuf>,
    /// ...and the Confluent schema ids written with it; messages with other ids are dead-lettered. Messages
    /// in Avro's single-object encoding are read by the schema's fingerprint instead; with no ids, only
    /// they are read.
    #[serde(default)]
    pub schema_ids: Vec<u32>,
}

impl InputConfig {
    /// An input of the service's own schema.
    pub fn new(topic: impl Into<String>, channel: impl Into<String>, format: Format) -> Self {
        Self {
            topic: topic.into(),
            channel: channel.into(),
            format: Some(format),
            preset: Preset::Stitcher,
            fields: None,
            schema_file: None,
            schema_ids: Vec::new(),
        }
    }

    /// The wire format of the messages.
    pub fn format(&self) -> Format {
        match self.format {
            Some(f) => f,
            None if self.fields.is_some() || self.preset != Preset::Stitcher => Format::Json,
            None => Format::Avro,
        }
    }

    /// How this input's messages are read: the mapping compiled, the writer schema loaded. The error
    /// says what is wrong, naming the path or the file.
    pub fn layout(
        &self,
        registry: Option<std::sync::Arc<crate::registry::Registry>>,
    ) -> Result<Layout, String> {
        let fields = match (&self.fields, self.preset) {
            (Some(_), Preset::Segment) => {
                return Err("give either `preset` or `fields`, not both".into())
            }
            (Some(fields), Preset::Stitcher) => fields.clone(),
            (None, Preset::Segment) => FieldMapping::segment(),
            (None, Preset::Stitcher) => {
                if self.schema_file.is_some() || !self.schema_ids.is_empty() {
                    return Err("`schema_file` and `schema_ids` are for Avro read through `preset` \
                                or `fields`; the service's own schema uses processing.avro_schema_ids"
                        .into());
                }
                // With a registry, an Avro input in the service's own schema also reads the other
                // versions of that schema the registry knows.
                let writer = registry
                    .filter(|_| self.format() == Format::Avro)
                    .map(Writer::Registry);
                return Ok(Layout {
                    writer,
                    ..Layout::native(self.format())
                });
            }
        };
        let mapping = Mapping::compile(&fields)?;
        let writer = match (self.format(), &self.schema_file) {
            (Format::Json, None) => None,
            (Format::Json, Some(_)) => {
                return Err("`schema_file` is for `format = \"avro\"`".into());
            }
            (Format::Avro, None) => match registry {
                Some(registry) => Some(Writer::Registry(registry)),
                None => {
                    return Err("Avro in the team's own schema needs its writer schemas: \
                                [registry] url, or `schema_file` and `schema_ids`"
                        .into())
                }
            },
            (Format::Avro, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("schema_file {}: {e}", path.display()))?;
                let codec = crate::codec::AvroCodec::from_text(&text)
                    .map_err(|e| format!("schema_file {}: {e}", path.display()))?;
                Some(Writer::File(
                    Box::new(codec),
                    self.schema_ids.iter().copied().collect(),
                ))
            }
        };
        Ok(Layout {
            format: self.format(),
            mapping: Some(mapping),
            writer,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// Profile updates, keyed by profile id (schemas/profile_update.avsc). Should be compacted.
    pub topic: String,
    /// Messages that could not be processed, with headers naming source and error.
    pub dead_letter_topic: String,
    /// The identity change stream (JSON, keyed by profile id, compacted; README "Identity change
    /// stream"); empty: none.
    pub identity_topic: String,
    /// Schema id written in the Confluent wire-format header of profile updates.
    pub schema_id: u32,
    /// Create missing output and dead-letter topics at start-up.
    pub create_topics: bool,
    /// Partitions for topics created at start-up.
    pub partitions: i32,
    /// Largest record produced, in bytes. At start-up the service lowers it to the broker's
    /// `message.max.bytes` and the output and dead-letter topics' `max.message.bytes` when those are
    /// smaller. A dead letter larger than this carries only the first part of its payload; a profile stays
    /// far smaller by the profile bounds (README "Bounds").
    pub max_record_bytes: usize,
    /// Whether the start-up reads the topics' configurations: their record limits for `max_record_bytes`,
    /// the changelog's cleanup policy. Not a setting: only the demo turns it off, since librdkafka's mock
    /// cluster does not answer DescribeConfigs (each read waited 10 s for nothing).
    #[serde(skip)]
    pub read_topic_configs: bool,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            topic: "profile-updates".into(),
            dead_letter_topic: "stitcher-dead-letters".into(),
            identity_topic: "identity-changes".into(),
            schema_id: 2,
            create_topics: true,
            partitions: 1,
            max_record_bytes: 1_000_000,
            read_topic_configs: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// ISO country whose calling code completes national phone numbers.
    pub default_country: String,
    /// Identifier types stored and emitted only as SHA-256 of their normalised value.
    pub hashed_types: Vec<String>,
    /// Identifier types accepted besides the built-in ones.
    pub custom_types: Vec<String>,
    /// Values refused for every type, besides the built-in junk list (case-insensitive).
    pub blocked_values: Vec<String>,
    /// Regular expressions; a normalised value matching any is refused.
    pub blocked_patterns: Vec<String>,
    /// Channels whose purchases count as in-store.
    pub store_channels: Vec<String>,
    /// Events with more identifiers than this go to the dead-letter topic.
    pub max_identifiers_per_event: usize,
    /// Longest accepted identifier value, in bytes.
    pub max_value_len: usize,
    /// The secret key of `hashed_types` (HMAC-SHA-256), from `STITCHER_HASH_KEY`; never in a file.
    #[serde(skip)]
    pub hash_key: Option<HashKey>,
    /// The secret salt of the suppression list (erasures with `suppress`), from
    /// `STITCHER_SUPPRESSION_SALT`; never in a file.
    #[serde(skip)]
    pub suppression_salt: Option<HashKey>,
}

/// The HMAC key of hashed identifier types. Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct HashKey(pub Vec<u8>);

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKey(..)")
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            default_country: "US".into(),
            hashed_types: vec![],
            custom_types: vec![],
            blocked_values: vec![],
            blocked_patterns: vec![],
            store_channels: vec!["pos".into(), "store".into()],
            max_identifiers_per_event: 32,
            max_value_len: 256,
            hash_key: None,
            suppression_salt: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardrailConfig {
    /// Most identifiers one profile may hold; a merge that would exceed it is refused.
    pub max_profile_identifiers: usize,
    /// Most values of one type a profile may hold (`email = 5`); a merge that would exceed it is refused.
    /// Per type, over the defaults: a file that sets `email` keeps the other types' limits; `0` is no limit.
    #[serde(deserialize_with = "limits_over_defaults")]
    pub limits: BTreeMap<String, usize>,
    /// Types in decreasing trust: the profile matched by the most trusted type is the one an event lands in
    /// when a merge is refused, and links are tried in this order.
    pub priority: Vec<String>,
    /// Shared-identifier detection: an identifier of one of these types that has been seen with more than
    /// this many distinct owner identifiers (`owner_types`) is a shared one (a family tablet, a shop's
    /// till, a call-centre phone): it stops linking, is taken out of the profile it glued together, which
    /// is recomputed from the link evidence and split, and lives on in a profile of its own. Per type, over
    /// the defaults, as `limits`; `0` is no detection for the type.
    #[serde(deserialize_with = "shared_limits_over_defaults")]
    pub shared_limits: BTreeMap<String, usize>,
    /// Types that name one person (an account, an email address, a loyalty card); what `shared_limits`
    /// counts.
    pub owner_types: Vec<String>,
}

impl GuardrailConfig {
    const LIMITS: [(&'static str, usize); 6] = [
        ("customer_id", 1),
        ("loyalty_id", 3),
        ("email", 5),
        ("phone", 5),
        ("device_id", 10),
        ("anonymous_id", 50),
    ];
    const SHARED_LIMITS: [(&'static str, usize); 3] =
        [("device_id", 3), ("anonymous_id", 3), ("phone", 3)];

    /// The types every list and table of the guardrails names must be known (built in or
    /// `identity.custom_types`): a misspelt type would otherwise leave its guardrail off, silently.
    fn validate(&self, custom_types: &[String]) -> Result<(), String> {
        let known = |t: &String| {
            crate::normalize::BUILTIN_TYPES.contains(&t.as_str()) || custom_types.contains(t)
        };
        let named = [
            ("limits", self.limits.keys().collect::<Vec<_>>()),
            ("priority", self.priority.iter().collect()),
            ("shared_limits", self.shared_limits.keys().collect()),
            ("owner_types", self.owner_types.iter().collect()),
        ];
        for (key, types) in named {
            if let Some(t) = types.into_iter().find(|t| !known(t)) {
                return Err(format!(
                    "guardrails.{key} names unknown identifier type {t:?} (known: {}{})",
                    crate::normalize::BUILTIN_TYPES.join(", "),
                    custom_types
                        .iter()
                        .map(|c| format!(", {c}"))
                        .collect::<String>()
                ));
            }
        }
        if let Some(t) = self
            .shared_limits
            .iter()
            .find(|(t, limit)| **limit > 0 && self.owner_types.contains(t))
        {
            return Err(format!(
                "guardrails: {:?} is both an owner type and has a shared limit (set shared_limits.{} = 0)",
                t.0, t.0
            ));
        }
        Ok(())
    }
}

fn table(entries: &[(&str, usize)]) -> BTreeMap<String, usize> {
    entries.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// The table given over `defaults`, key by key.
fn over_defaults<'de, D: serde::Deserializer<'de>>(
    d: D,
    defaults: &[(&str, usize)],
) -> Result<BTreeMap<String, usize>, D::Error> {
    let mut merged = table(defaults);
    merged.extend(BTreeMap::<String, usize>::deserialize(d)?);
    Ok(merged)
}

fn limits_over_defaults<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, usize>, D::Error> {
    over_defaults(d, &GuardrailConfig::LIMITS)
}

fn shared_limits_over_defaults<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, usize>, D::Error> {
    over_defaults(d, &GuardrailConfig::SHARED_LIMITS)
}

impl Default for GuardrailConfig {
    fn default() -> Self {
        Self {
            max_profile_identifiers: 200,
            limits: table(&Self::LIMITS),
            priority: [
                "customer_id",
                "loyalty_id",
                "email",
                "phone",
                "device_id",
                "anonymous_id",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            shared_limits: table(&Self::SHARED_LIMITS),
            owner_types: ["customer_id", "email", "loyalty_id"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// RocksDB directory; holds the graph, profiles and the committed input offsets.
    pub dir: PathBuf,
    /// RocksDB block cache, in MiB.
    pub block_cache_mb: usize,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./stitcher-state"),
            block_cache_mb: 256,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Kafka transactions: output records, dead letters, shard messages, state changes and input offsets
    /// commit atomically. The only guarantee: the shards' state is their changelog, so it cannot be
    /// written apart from the offsets.
    ExactlyOnce,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessingConfig {
    pub guarantee: Guarantee,
    /// Most input messages in one batch (one transaction).
    pub batch_max_events: usize,
    /// Longest wait to fill a batch before committing what there is (a batch ends sooner once the batch
    /// before it committed and no message is waiting).
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
    /// Shortest time a batch stays open before it ends that sooner way (at most `batch_linger`): a
    /// ceiling on the transaction rate at low and moderate load; a full batch still ends at once. "0s":
    /// a batch may end as soon as the one before it committed.
    #[serde(with = "humantime_serde")]
    pub batch_min_duration: Duration,
    /// On SIGTERM/SIGINT: how long the current batch may take to finish and commit.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Kafka transaction timeout (`transaction.timeout.ms`).
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
    /// Schema ids accepted on Avro inputs, all read with schemas/channel_event.avsc; others go to the
    /// dead-letter topic.
    pub avro_schema_ids: Vec<u32>,
    /// Largest accepted input message, in bytes.
    pub max_message_bytes: usize,
    /// How long an applied event id is remembered; a duplicate arriving later than this after the first
    /// copy is applied again. Bounds the dedup set by the event rate. "0s": forever.
    #[serde(with = "humantime_serde")]
    pub dedup_retention: Duration,
}

impl Default for ProcessingConfig {
    fn default() -> Self {
        Self {
            guarantee: Guarantee::ExactlyOnce,
            batch_max_events: 2000,
            batch_linger: Duration::from_millis(100),
            batch_min_duration: Duration::from_millis(25),
            drain_timeout: Duration::from_secs(30),
            transaction_timeout: Duration::from_secs(60),
            avro_schema_ids: vec![1],
            max_message_bytes: 1 << 20,
            dedup_retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of /metrics, /healthz, /readyz and the profile lookup API. Loopback unless you mean it.
    pub listen: SocketAddr,
    /// When set, the lookup API requires `Authorization: Bearer <token>` (metrics and probes do not).
    pub bearer_token: Option<String>,
    /// `host:port` at which the other instances reach this one's HTTP API, to forward lookups in scale-out
    /// mode (a StatefulSet pod's DNS name). Default: `listen`.
    pub advertised_address: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            bearer_token: None,
            advertised_address: None,
        }
    }
}

impl HttpConfig {
    /// Where the other instances reach this one.
    pub fn advertised(&self) -> String {
        self.advertised_address
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }
}

/// Values given on the command line; they win over everything else.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub brokers: Option<String>,
    pub group_id: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub http_listen: Option<SocketAddr>,
}

/// The variables Kubernetes injects for a Service named `stitcher` (`STITCHER_SERVICE_HOST`,
/// `STITCHER_PORT_9464_TCP_PROTO`, ...), without the prefix.
fn is_platform_variable(key: &str) -> bool {
    key == "PORT"
        || key.starts_with("PORT_")
        || key == "SERVICE_HOST"
        || key.starts_with("SERVICE_PORT")
}

impl Config {
    /// Loads defaults < file < environment < flags, then validates.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut cfg = match file {
            Some(path) => Self::from_toml_file(path)?,
            None => Config::default(),
        };
        cfg.apply_env(env)?;
        cfg.apply_flags(flags);
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_path_buf(),
            error,
        })
    }

    /// `STITCHER_BROKERS`, `STITCHER_GROUP_ID`, `STITCHER_TRANSACTIONAL_ID`, `STITCHER_INSTANCE_ID`, `STITCHER_STATE_DIR`,
    /// `STITCHER_HTTP_LISTEN`, `STITCHER_OUTPUT_TOPIC`, `STITCHER_IDENTITY_TOPIC`, `STITCHER_HTTP_BEARER_TOKEN`, and
    /// `STITCHER_RDKAFKA__<NAME>` for any librdkafka setting (`STITCHER_RDKAFKA__SASL_PASSWORD` sets
    /// `sasl.password`).
    pub fn apply_env(
        &mut self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (name, value) in env {
            let Some(key) = name.strip_prefix("STITCHER_") else {
                continue;
            };
            match key {
                "BROKERS" => self.kafka.brokers = value,
                "GROUP_ID" => self.kafka.group_id = value,
                "TRANSACTIONAL_ID" => self.kafka.transactional_id = value,
                "INSTANCE_ID" => self.kafka.instance_id = value,
                "STATE_DIR" => self.state.dir = PathBuf::from(value),
                "OUTPUT_TOPIC" => self.output.topic = value,
                "IDENTITY_TOPIC" => self.output.identity_topic = value,
                "HTTP_BEARER_TOKEN" => self.http.bearer_token = Some(value),
                "HTTP_ADVERTISED_ADDRESS" => self.http.advertised_address = Some(value),
                "HTTP_LISTEN" => {
                    self.http.listen = value.parse().map_err(|e| ConfigError::Env {
                        name: name.clone(),
                        reason: format!("{e}"),
                    })?
                }
                "LOG" | "LOG_FORMAT" => {}
                "HASH_KEY" => self.identity.hash_key = Some(HashKey(value.into_bytes())),
                "SUPPRESSION_SALT" => {
                    self.identity.suppression_salt = Some(HashKey(value.into_bytes()))
                }
                "REGISTRY_URL" => self.registry.url = value,
                "REGISTRY_USERNAME" => self.registry.username = value,
                "REGISTRY_PASSWORD" => self.registry.password = value,
                _ => {
                    if let Some(setting) = key.strip_prefix("RDKAFKA__") {
                        self.kafka
                            .common
                            .insert(setting.to_ascii_lowercase().replace('_', "."), value);
                    } else if is_platform_variable(key) {
                        // Kubernetes service links for a Service named `stitcher`.
                        tracing::debug!(name, "ignoring a service-link environment variable");
                    } else {
                        // A platform may inject variables of its own: never a reason not to start. A typo
                        // in a setting's name is worth a warning.
                        tracing::warn!(name, "ignoring unknown STITCHER_ environment variable");
                    }
                }
            }
        }
        Ok(())
    }

    pub fn apply_flags(&mut self, flags: &Overrides) {
        if let Some(b) = &flags.brokers {
            self.kafka.brokers = b.clone();
        }
        if let Some(g) = &flags.group_id {
            self.kafka.group_id = g.clone();
        }
        if let Some(d) = &flags.state_dir {
            self.state.dir = d.clone();
        }
        if let Some(l) = flags.http_listen {
            self.http.listen = l;
        }
    }

    /// The internal topic of the messages between shards: `scaleout.topic`, or `<group_id>-shards`.
    pub fn shard_topic(&self) -> String {
        if self.scaleout.topic.is_empty() {
            format!("{}-shards", self.kafka.group_id)
        } else {
            self.scaleout.topic.clone()
        }
    }

    /// The compacted changelog of the shards' state: `<shard topic>-changelog`.
    pub fn changelog_topic(&self) -> String {
        format!("{}-changelog", self.shard_topic())
    }

    /// Every topic the service reads or writes, with the setting that names it.
    pub fn topic_roles(&self) -> Vec<(String, String)> {
        let inputs = self.inputs.iter().map(|i| {
            (
                format!("the input of channel {:?}", i.channel),
                i.topic.clone(),
            )
        });
        let own = [
            ("output.topic", self.output.topic.clone()),
            (
                "output.dead_letter_topic",
                self.output.dead_letter_topic.clone(),
            ),
            ("output.identity_topic", self.output.identity_topic.clone()),
            ("control.topic", self.control.topic.clone()),
            (
                "breaker.quarantine_topic",
                if self.breaker.enabled() {
                    self.breaker.quarantine_topic.clone()
                } else {
                    String::new()
                },
            ),
            ("the shard topic (scaleout.topic)", self.shard_topic()),
            ("the shard topic's changelog", self.changelog_topic()),
        ]
        .into_iter()
        .filter(|(_, t)| !t.is_empty())
        .map(|(setting, t)| (setting.to_string(), t));
        inputs.chain(own).collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.inputs.is_empty() {
            return invalid("at least one [[inputs]] topic is required".into());
        }
        let mut topics = std::collections::HashSet::new();
        let registry = match self.registry.enabled() {
            true => match crate::registry::Registry::new(&self.registry) {
                Ok(r) => Some(std::sync::Arc::new(r)),
                Err(e) => return invalid(e.to_string()),
            },
            false => None,
        };
        for input in &self.inputs {
            if input.topic.is_empty() || input.channel.is_empty() {
                return invalid("every input needs a topic and a channel".into());
            }
            if !topics.insert(&input.topic) {
                return invalid(format!("input topic {:?} is listed twice", input.topic));
            }
            if let Err(e) = input.layout(registry.clone()) {
                return invalid(format!("input {:?}: {e}", input.topic));
            }
        }
        if self.output.topic.is_empty() || self.output.dead_letter_topic.is_empty() {
            return invalid("output.topic and output.dead_letter_topic are required".into());
        }
        if self.output.max_record_bytes < 16 * 1024 {
            return invalid("output.max_record_bytes must be at least 16384".into());
        }
        if let Err(e) = self.enrichment.validate(self.output.max_record_bytes) {
            return invalid(e);
        }
        if self.processing.batch_max_events == 0 {
            return invalid("processing.batch_max_events must be at least 1".into());
        }
        if self.processing.transaction_timeout < Duration::from_secs(1) {
            return invalid("processing.transaction_timeout must be at least 1s".into());
        }
        if self.guardrails.max_profile_identifiers == 0 {
            return invalid("guardrails.max_profile_identifiers must be at least 1".into());
        }
        if self
            .http
            .bearer_token
            .as_ref()
            .is_some_and(|t| t.trim().is_empty())
        {
            // An unmounted secret, say: the lookups would take any `Authorization: Bearer ` header.
            return invalid(
                "http.bearer_token (STITCHER_HTTP_BEARER_TOKEN) is set but empty: give the token, or \
                 leave it unset for lookups without one"
                    .into(),
            );
        }
        if self.kafka.brokers.trim().is_empty() {
            return invalid(
                "kafka.brokers is empty: give the bootstrap servers (host:port, comma separated)"
                    .into(),
            );
        }
        if self.kafka.group_id.is_empty() || self.kafka.transactional_id.is_empty() {
            return invalid("kafka.group_id and kafka.transactional_id are required".into());
        }
        if let Err(e) = self.breaker.validate() {
            return invalid(e);
        }
        if !self.scaleout.enabled() {
            return invalid(
                "scaleout.shards must be at least 1 (one instance holds every shard when alone)"
                    .into(),
            );
        }
        // One topic in two roles mixes what each carries, or loops: a dead-letter topic that is also an
        // input read every dead letter again, for ever.
        let roles = self.topic_roles();
        for (i, (setting, topic)) in roles.iter().enumerate() {
            if let Some((other, _)) = roles[..i].iter().find(|(_, t)| t == topic) {
                return invalid(format!(
                    "{other} and {setting} are the same topic {topic:?}: each needs a topic of its own"
                ));
            }
        }
        if let Some(t) = self
            .identity
            .custom_types
            .iter()
            .find(|t| t.contains(crate::model::SCOPE_SEPARATOR))
        {
            return invalid(format!(
                "identity.custom_types: {t:?} contains '{}', which marks channel-scoped identifiers",
                crate::model::SCOPE_SEPARATOR
            ));
        }
        if let Err(e) = self.guardrails.validate(&self.identity.custom_types) {
            return invalid(e);
        }
        if !(self.limits.max_amount.is_finite() && self.limits.max_amount > 0.0)
            || self.limits.max_amount > 1e15
        {
            return invalid("limits.max_amount must be a positive number up to 1e15".into());
        }
        if self.limits.max_quantity < 1 {
            return invalid("limits.max_quantity must be at least 1".into());
        }
        if self
            .identity
            .suppression_salt
            .as_ref()
            .is_some_and(|s| s.0.len() < 16)
        {
            return invalid("STITCHER_SUPPRESSION_SALT must be at least 16 bytes".into());
        }
        crate::normalize::Normalizer::new(&self.identity)?;
        Ok(())
    }

    /// The channel configured for a topic.
    pub fn input(&self, topic: &str) -> Option<&InputConfig> {
        self.inputs.iter().find(|i| i.topic == topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        [kafka]
        brokers = "127.0.0.1:19092"
        common = { "client.id" = "stitcher-test" }

        [[inputs]]
        topic = "web-events"
        channel = "web"
        format = "json"

        [[inputs]]
        topic = "pos-events"
        channel = "pos"

        [processing]
        batch_linger = "250ms"
        drain_timeout = "10s"

        [guardrails.limits]
        email = 3
    "#;

    /// The reference file in deploy/config documents every key with its default: it must load, and apart
    /// from the inputs and custom types it lists, equal the built-in defaults.
    #[test]
    fn reference_config_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config/stitcher.toml");
        let mut cfg = Config::from_toml_file(&path).unwrap();
        assert_eq!(cfg.inputs.len(), 6);
        cfg.validate().unwrap();
        cfg.inputs.clear();
        cfg.identity.custom_types.clear();
        let defaults = Config::default();
        assert_eq!(
            toml::to_string(&cfg).unwrap(),
            toml::to_string(&defaults).unwrap()
        );
    }

    /// Presets and field mappings are chosen per input, read JSON by default, and are checked at
    /// start-up with errors that name the input and the path.
    #[test]
    fn inputs_in_other_layouts_are_checked_at_start_up() {
        let with_inputs = |inputs: &str| -> Result<Config, String> {
            let cfg: Config = toml::from_str(inputs).map_err(|e| e.to_string())?;
            cfg.validate().map_err(|e| e.to_string())?;
            Ok(cfg)
        };
        let cfg = with_inputs(
            r#"
            [[inputs]]
            topic = "site-tracks"
            channel = "web"
            preset = "segment"

            [[inputs]]
            topic = "tickets"
            channel = "callcenter"
            [inputs.fields]
            event_id = "id"
            timestamp = "opened_at"
            default_event_type = "call"
            identifiers = [{ type = "email", path = "customer.email" }]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.inputs[0].format(), Format::Json);
        assert!(cfg.inputs[0].layout(None).unwrap().mapping.is_some());
        assert_eq!(cfg.inputs[1].format(), Format::Json);

        let err = |inputs: &str| with_inputs(inputs).unwrap_err();
        let e = err(r#"
            [[inputs]]
            topic = "tickets"
            channel = "callcenter"
            [inputs.fields]
            event_id = "id"
            timestamp = "opened_at"
            default_event_type = "call"
            identifiers = [{ type = "email", path = "customer..email" }]
            "#);
        assert!(
            e.contains("input \"tickets\": identifiers[0].path \"customer..email\""),
            "{e}"
        );
        let e = err(r#"
            [[inputs]]
            topic = "tills"
            channel = "pos"
            format = "avro"
            preset = "segment"
            "#);
        assert!(e.contains("schema_file"), "{e}");
        let e = err(r#"
            [[inputs]]
            topic = "tills"
            channel = "pos"
            preset = "segment"
            [inputs.fields]
            event_id = "id"
            timestamp = "ts"
            default_event_type = "sale"
            "#);
        assert!(e.contains("either `preset` or `fields`"), "{e}");
        let e = err(r#"
            [[inputs]]
            topic = "tills"
            channel = "pos"
            preset = "snowplow"
            "#);
        assert!(e.contains("snowplow"), "{e}");
    }

    /// The service always reads the topics' configurations; a file cannot turn that off (only the demo
    /// does).
    #[test]
    fn the_topic_configs_are_read_whatever_the_file_says() {
        let cfg: Config = toml::from_str("[output]\nmax_record_bytes = 500000\n").unwrap();
        assert!(cfg.output.read_topic_configs);
        let refused = toml::from_str::<Config>("[output]\nread_topic_configs = false\n");
        assert!(refused.is_err());
    }

    /// A guardrail table set in a file changes the types it names and keeps the others' defaults (it
    /// replaced the whole table: `email = 3` took away the customer id's limit of 1); 0 turns one off.
    #[test]
    fn guardrail_tables_apply_over_the_defaults_type_by_type() {
        let cfg: Config = toml::from_str(
            "[guardrails.limits]\nemail = 3\ndevice_id = 0\n[guardrails.shared_limits]\nphone = 0\n",
        )
        .unwrap();
        let limits = &cfg.guardrails.limits;
        assert_eq!(limits.get("email"), Some(&3));
        assert_eq!(limits.get("customer_id"), Some(&1));
        assert_eq!(limits.get("anonymous_id"), Some(&50));
        assert_eq!(cfg.guardrails.shared_limits.get("device_id"), Some(&3));
        let rules = crate::stitch::Rules::new(&cfg.guardrails);
        let id = |kind: &str| crate::model::Identifier::new(kind, "x");
        assert_eq!(rules.shared_limit(&id("device_id")), Some(3));
        assert_eq!(rules.shared_limit(&id("phone")), None, "0 is no detection");
        // The written form reads back as the same configuration (the bench hands the service a file).
        let again: Config = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(again.guardrails.limits, cfg.guardrails.limits);
        assert_eq!(again.guardrails.shared_limits, cfg.guardrails.shared_limits);
    }

    /// Every type the guardrails name must exist: a misspelt one would leave its guardrail off.
    #[test]
    fn guardrails_naming_an_unknown_type_are_refused() {
        let with = |guardrails: &str| {
            let text = format!(
                "[[inputs]]\ntopic = \"web\"\nchannel = \"web\"\n\
                 [identity]\ncustom_types = [\"ticket_id\"]\n[guardrails]\n{guardrails}\n"
            );
            toml::from_str::<Config>(&text).unwrap().validate()
        };
        for (bad, key, name) in [
            ("limits = { emial = 3 }", "limits", "emial"),
            (
                "priority = [\"customer_id\", \"emial\"]",
                "priority",
                "emial",
            ),
            (
                "shared_limits = { devise_id = 2 }",
                "shared_limits",
                "devise_id",
            ),
            ("owner_types = [\"emial\"]", "owner_types", "emial"),
        ] {
            let e = with(bad).unwrap_err().to_string();
            let named = format!("guardrails.{key} names unknown identifier type {name:?}");
            assert!(e.contains(&named), "{bad}: {e}");
        }
        with("limits = { ticket_id = 2 }\npriority = [\"ticket_id\"]").unwrap();
        // An owner type cannot also have a shared limit, unless that limit is turned off.
        let e = with("owner_types = [\"email\", \"phone\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("shared_limits.phone = 0"), "{e}");
        with("owner_types = [\"email\", \"phone\"]\nshared_limits = { phone = 0 }").unwrap();
    }

    /// A file that cannot be read or parsed is reported once, as the service prints its errors (the
    /// whole chain): the cause was both in the message and the source, so printed twice.
    #[test]
    fn a_bad_config_file_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("absent.toml");
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[http]\nlisten = \"localhost:9464\"\n").unwrap();
        for (path, cause) in [
            (&absent, "No such file or directory"),
            (&bad, "invalid socket address syntax"),
        ] {
            let e = Config::from_toml_file(path).unwrap_err();
            let printed = format!("{:#}", anyhow::Error::from(e));
            assert_eq!(printed.matches(cause).count(), 1, "{printed}");
            assert!(printed.contains(&path.display().to_string()), "{printed}");
        }
    }

    #[test]
    fn file_env_and_flags_apply_in_order() {
        let mut cfg: Config = toml::from_str(EXAMPLE).unwrap();
        assert_eq!(cfg.inputs[1].format(), Format::Avro);
        assert_eq!(cfg.processing.batch_linger, Duration::from_millis(250));
        assert_eq!(cfg.guardrails.limits.get("email"), Some(&3));
        cfg.apply_env([
            ("STITCHER_BROKERS".to_string(), "127.0.0.1:1".to_string()),
            (
                "STITCHER_RDKAFKA__SASL_USERNAME".to_string(),
                "alice".to_string(),
            ),
            ("PATH".to_string(), "/bin".to_string()),
        ])
        .unwrap();
        assert_eq!(cfg.kafka.brokers, "127.0.0.1:1");
        assert_eq!(
            cfg.kafka.common.get("sasl.username").map(String::as_str),
            Some("alice")
        );
        cfg.apply_flags(&Overrides {
            brokers: Some("127.0.0.1:2".into()),
            ..Default::default()
        });
        assert_eq!(cfg.kafka.brokers, "127.0.0.1:2");
        cfg.validate().unwrap();
    }

    /// Kubernetes injects `<SERVICE>_PORT_...` variables for every Service in the namespace; one named
    /// `stitcher` must not stop the pods from starting, nor may any other unknown `STITCHER_` variable.
    #[test]
    fn injected_environment_variables_are_ignored() {
        let mut cfg: Config = toml::from_str(EXAMPLE).unwrap();
        let before = toml::to_string(&cfg).unwrap();
        let injected = [
            ("STITCHER_PORT", "tcp://10.0.0.7:9464"),
            ("STITCHER_PORT_9464_TCP", "tcp://10.0.0.7:9464"),
            ("STITCHER_PORT_9464_TCP_PROTO", "tcp"),
            ("STITCHER_PORT_9464_TCP_PORT", "9464"),
            ("STITCHER_PORT_9464_TCP_ADDR", "10.0.0.7"),
            ("STITCHER_SERVICE_HOST", "10.0.0.7"),
            ("STITCHER_SERVICE_PORT", "9464"),
            ("STITCHER_SERVICE_PORT_HTTP", "9464"),
            ("STITCHER_SOMETHING_ELSE", "1"),
        ];
        cfg.apply_env(injected.map(|(k, v)| (k.to_string(), v.to_string())))
            .unwrap();
        assert_eq!(toml::to_string(&cfg).unwrap(), before);
    }

    /// No topic may serve two roles; each pair is named.
    #[test]
    fn each_topic_serves_one_role() {
        let base: Config = toml::from_str(EXAMPLE).unwrap();
        base.validate().unwrap();
        let web = base.inputs[0].topic.clone();
        type Change<'a> = Box<dyn Fn(&mut Config) + 'a>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|c| c.output.dead_letter_topic = web.clone()),
                "output.dead_letter_topic are the same topic",
            ),
            (
                Box::new(|c| c.output.topic = web.clone()),
                "and output.topic are the same topic",
            ),
            (
                Box::new(|c| c.output.identity_topic = c.output.topic.clone()),
                "output.topic and output.identity_topic",
            ),
            (
                Box::new(|c| c.output.dead_letter_topic = c.output.topic.clone()),
                "output.topic and output.dead_letter_topic",
            ),
            (
                Box::new(|c| c.control.topic = c.output.dead_letter_topic.clone()),
                "output.dead_letter_topic and control.topic",
            ),
            (
                Box::new(|c| c.scaleout.topic = web.clone()),
                "and the shard topic (scaleout.topic)",
            ),
            (
                Box::new(|c| c.output.topic = format!("{}-changelog", c.shard_topic())),
                "output.topic and the shard topic's changelog",
            ),
        ];
        for (change, says) in cases {
            let mut cfg = base.clone();
            change(&mut cfg);
            let err = cfg.validate().expect_err(says).to_string();
            assert!(err.contains(says), "{err}");
        }
        let mut off = base.clone();
        off.output.identity_topic = String::new();
        off.control.topic = String::new();
        off.validate().expect("empty topics are no role");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<Config>("[kafka]\nbrokerz = \"x\"").is_err());
        let mut cfg: Config = toml::from_str(EXAMPLE).unwrap();
        assert!(cfg
            .apply_env([("STITCHER_HTTP_LISTEN".to_string(), "nowhere".to_string())])
            .is_err());
        cfg.output.topic = "web-events".into();
        assert!(cfg.validate().is_err());
        let mut cfg: Config = toml::from_str(EXAMPLE).unwrap();
        cfg.identity.default_country = "Atlantis".into();
        assert!(cfg.validate().is_err());
        // No brokers (an empty STITCHER_BROKERS, say): refused at once, not retried for ever.
        let mut cfg: Config = toml::from_str(EXAMPLE).unwrap();
        cfg.apply_env([("STITCHER_BROKERS".to_string(), " ".to_string())])
            .unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("kafka.brokers is empty"), "{e}");
        // An empty token (a secret not mounted) would let any `Bearer ` header through.
        let mut cfg: Config = toml::from_str(EXAMPLE).unwrap();
        cfg.apply_env([("STITCHER_HTTP_BEARER_TOKEN".to_string(), String::new())])
            .unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("set but empty"), "{e}");
    }
}
