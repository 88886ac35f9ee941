//! Harness for integration tests against a real broker: unique topics, the service as a child process,
//! the compacted read_committed view of the output topic, and comparison with the ground truth.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::TopicPartitionList;
use stitcher::config::RegistryConfig;
use stitcher::registry::Registry;

use stitcher::codec::update::ProfileRecord;
use stitcher::codec::{AvroCodec, ProfileUpdate};
use stitcher::config::Format;
use stitcher::generate::Routes;
use stitcher::journeys::{self, PersonTruth, StoryTruth};

/// Inside `[guardrails]`: every default type limit and shared limit turned off (a table in a file applies
/// over the defaults type by type, and 0 is none).
pub const NO_TYPE_LIMITS: &str = "limits = { customer_id = 0, loyalty_id = 0, email = 0, phone = 0, \
    device_id = 0, anonymous_id = 0 }\nshared_limits = { device_id = 0, anonymous_id = 0, phone = 0 }\n";

/// A free loopback port: bind to 0, read it, release it for a service.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// GET `path` from a service listening on loopback `port`: (status, body). Plain HTTP/1.0.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let (status, _, body) = http_get_head(port, path);
    (status, body)
}

/// Whether a service listens on loopback `port` and answers `/readyz` with 200 (`false` while it does not
/// listen yet).
pub fn is_ready(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && http_get(port, "/readyz").0 == 200
}

/// Like [`http_get`], with the response's header lines (lower-cased names) as well.
pub fn http_get_head(port: u16, path: &str) -> (u16, Vec<(String, String)>, String) {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to service");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// An environment variable parsed, or `default` (soak knobs of the tests).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn brokers() -> String {
    std::env::var("TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// One test's topics, group, state dir and config file.
pub struct Setup {
    pub name: String,
    pub routes: Routes,
    pub input_topics: Vec<String>,
    pub output_topic: String,
    /// The identity change stream.
    pub identity_topic: String,
    pub dlq_topic: String,
    /// Erase / unlink commands (its own per setup).
    pub control_topic: String,
    pub group: String,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    /// Loopback port of the service's HTTP endpoints.
    pub http_port: u16,
    /// Every service process started, killed when the setup is dropped (also when a test panics).
    pids: std::cell::RefCell<Vec<u32>>,
}

impl Setup {
    /// Creates `partitions`-partition topics for every channel (Avro and JSON alternately) and writes the
    /// service config.
    pub fn new(test: &str, partitions: i32, extra_toml: &str) -> Setup {
        Self::secured(test, partitions, &brokers(), extra_toml)
    }

    /// Like [`Setup::new`], but the service talks to `service_brokers` (a SASL or TLS listener of the same
    /// broker; `extra_toml` carries the security settings). The harness itself uses the plain listener.
    pub fn secured(test: &str, partitions: i32, service_brokers: &str, extra_toml: &str) -> Setup {
        let name = unique(test);
        let (routes, input_topics) = stitcher::generate::channel_routes(&name);
        create_topics(&input_topics, partitions);
        Self::with_inputs(name, routes, input_topics, service_brokers, extra_toml)
    }

    /// A second service over the same input topics, with its own group, output topics and state.
    pub fn sibling(&self, test: &str, extra_toml: &str) -> Setup {
        Self::with_inputs(
            unique(test),
            self.routes.clone(),
            self.input_topics.clone(),
            &brokers(),
            extra_toml,
        )
    }

    fn with_inputs(
        name: String,
        routes: Routes,
        input_topics: Vec<String>,
        service_brokers: &str,
        extra_toml: &str,
    ) -> Setup {
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut inputs = String::new();
        let mut channels: Vec<_> = routes.iter().collect();
        channels.sort_by_key(|(ch, _)| ch.as_str());
        for (ch, (topic, format)) in channels {
            let fmt = if *format == Format::Avro {
                "avro"
            } else {
                "json"
            };
            inputs.push_str(&format!(
                "[[inputs]]\ntopic = \"{topic}\"\nchannel = \"{ch}\"\nformat = \"{fmt}\"\n\n"
            ));
        }
        let http_port = free_port();
        let output_topic = format!("{name}-profiles");
        let dlq_topic = format!("{name}-dlq");
        let identity_topic = format!("{name}-identity");
        let control_topic = format!("{name}-control");
        create_topics(std::slice::from_ref(&control_topic), 1);
        let group = format!("{name}-group");
        let config = format!(
            r#"[kafka]
brokers = "{brokers}"
group_id = "{group}"
transactional_id = "{name}"

{inputs}
[output]
topic = "{output_topic}"
dead_letter_topic = "{dlq_topic}"
identity_topic = "{identity_topic}"
partitions = 3

[identity]
custom_types = ["social_id"]

[state]
dir = "{state}"
block_cache_mb = 32

{processing}
[http]
listen = "127.0.0.1:{http_port}"
{traits}
[control]
topic = "{control_topic}"
{extra_toml}
"#,
            brokers = service_brokers,
            state = dir.join("state").display(),
            http_port = http_port,
            traits = journeys::TRUTH_TRAITS,
            // A test may set its own.
            processing = if extra_toml.contains("[processing]") {
                ""
            } else {
                "[processing]\nbatch_linger = \"50ms\"\ndrain_timeout = \"20s\"\n"
            },
        );
        let config_path = dir.join("stitcher.toml");
        std::fs::File::create(&config_path)
            .and_then(|mut f| f.write_all(config.as_bytes()))
            .expect("config");
        Setup {
            name,
            routes,
            input_topics,
            output_topic,
            identity_topic,
            dlq_topic,
            control_topic,
            group,
            dir,
            config_path,
            http_port,
            pids: Default::default(),
        }
    }

    /// An input topic that takes JSON events.
    pub fn json_topic(&self) -> String {
        self.routes
            .values()
            .find(|(_, f)| *f == stitcher::config::Format::Json)
            .expect("a JSON channel")
            .0
            .clone()
    }

    /// GET `path` from the service: (status, body). Plain HTTP/1.0 over loopback.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.http_port, path)
    }

    /// Starts the service binary.
    pub fn start(&self) -> Child {
        self.start_with_env(&[])
    }

    /// Starts the service binary with extra environment variables (secrets, as a deployment passes them).
    pub fn start_with_env(&self, env: &[(&str, &str)]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("service.log"))
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stitcher"));
        // The config file says everything; no STITCHER_* variable of the caller's shell may override it.
        for (k, _) in std::env::vars() {
            if k.starts_with("STITCHER_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied());
        cmd.args(["run", "--config"])
            .arg(&self.config_path)
            .env("STITCHER_LOG", "info,librdkafka=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .inspect(|c| self.pids.borrow_mut().push(c.id()))
            .expect("spawn stitcher")
    }

    /// Everything the service instances of this setup logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("service.log")).unwrap_or_default()
    }

    /// What a timed-out wait reports: the log's tail, then each live instance's threads where they stand
    /// (by gdb, if the machine has it), to tell a stuck loop from a slow one.
    pub fn stuck_report(&self, children: &[&mut Child]) -> String {
        let mut report = self.log_tail();
        for child in children {
            let pid = child.id().to_string();
            let stacks = Command::new("gdb")
                .args(["-p", &pid, "-batch", "-ex", "thread apply all bt 30"])
                .output();
            if let Ok(out) = stacks {
                let text = String::from_utf8_lossy(&out.stdout);
                let frames: Vec<&str> = text
                    .lines()
                    .filter(|l| l.starts_with("Thread ") || l.starts_with('#'))
                    .collect();
                report.push_str(&format!(
                    "\n--- threads of pid {pid}:\n{}",
                    frames.join("\n")
                ));
            }
        }
        report
    }

    /// Restores of this setup's instances that found aborted changes in their local copy and rebuilt the
    /// shard (docs/DESIGN.md, "Restore"), as they logged them: the count survives a killed process, which
    /// `stitcher_state_rewound_total` does not.
    pub fn rewound(&self) -> usize {
        self.log()
            .matches("holds changes of an aborted transaction")
            .count()
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("service.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Runs the stitcher binary with this setup's config (a CLI command such as `erase`); its output.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_with_env(args, &[])
    }

    /// [`Setup::cli`] with these environment variables (a secret, say).
    pub fn cli_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stitcher"));
        for (k, _) in std::env::vars() {
            if k.starts_with("STITCHER_") {
                cmd.env_remove(k);
            }
        }
        let out = cmd
            .envs(env.iter().copied())
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .output()
            .expect("run stitcher");
        assert!(
            out.status.success(),
            "stitcher {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Messages the group has committed, summed over the input and control topics, and the total in them.
    /// Retries through transient broker errors (leaders moving after a broker restart) for up to a minute.
    pub fn progress(&self) -> (i64, i64) {
        self.progress_of(&self.progress_topics())
    }

    /// Messages the group has committed on `topics`, and the total in them (summed high watermarks, read
    /// before the committed offsets).
    pub fn progress_of(&self, topics: &[&str]) -> (i64, i64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.try_progress(topics) {
                Ok(p) => return p,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("progress: {e}, retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("cannot read progress: {e}"),
            }
        }
    }

    /// Waits until the group has committed at least `share` of the messages on `topics` (so also when
    /// everything is committed) and returns that reading; panics with the log's tail if one of `children`
    /// exits meanwhile or `timeout` passes.
    pub fn wait_for_share(
        &self,
        topics: &[&str],
        share: f64,
        children: &mut [&mut Child],
        timeout: Duration,
    ) -> (i64, i64) {
        let deadline = Instant::now() + timeout;
        loop {
            for child in children.iter_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("a service exited by itself ({status})\n{}", self.log_tail());
                }
            }
            let (committed, total) = self.progress_of(topics);
            if committed as f64 >= share * total as f64 {
                return (committed, total);
            }
            assert!(
                Instant::now() < deadline,
                "{share} of the input not committed within {timeout:?}\n{}",
                self.stuck_report(children)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The input and control topics, whose committed offsets are the group's progress.
    pub fn progress_topics(&self) -> Vec<&str> {
        self.input_topics
            .iter()
            .chain([&self.control_topic])
            .map(String::as_str)
            .collect()
    }

    fn try_progress(&self, topics: &[&str]) -> Result<(i64, i64), rdkafka::error::KafkaError> {
        // Without waiting for a gap between the service's transactions (the crash test's kills, timed
        // after a reading, fell near such gaps).
        let consumer = stitcher::kafka::progress_reader(&brokers(), &self.group)?;
        let mut total = 0;
        let mut tpl = TopicPartitionList::new();
        for topic in topics {
            let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
            for p in md.topics()[0].partitions() {
                tpl.add_partition(topic, p.id());
                let (_, high) =
                    consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
                total += high;
            }
        }
        let committed = stitcher::kafka::committed_sum(&consumer, tpl, Duration::from_secs(10))?;
        Ok((committed, total))
    }

    /// Waits until `done`, failing the test with the log's tail if that takes longer than `timeout`; how
    /// long it took.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut() -> bool,
    ) -> Duration {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < timeout,
                "{what}: not within {timeout:?}\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        start.elapsed()
    }

    /// Changes the service config before a start (`edit` gets and returns the TOML text).
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config_path).expect("config");
        std::fs::write(&self.config_path, edit(text)).expect("config");
    }

    /// Records of `topic` past the group's committed offsets, as a read_committed consumer sees them (at
    /// least 1 if that could not be read to the end of every partition).
    pub fn backlog(&self, topic: &str) -> Result<usize, rdkafka::error::KafkaError> {
        use rdkafka::error::KafkaError;
        use rdkafka::Offset;
        let admin: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", &self.group)
            .create()?;
        let md = admin.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let mut tpl = TopicPartitionList::new();
        for p in md.topics()[0].partitions() {
            tpl.add_partition(topic, p.id());
        }
        let partitions = tpl.count();
        let committed = admin.committed_offsets(tpl, Duration::from_secs(10))?;
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", unique("backlog"))
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("enable.auto.commit", "false")
            .create()?;
        let mut from = TopicPartitionList::new();
        for e in committed.elements() {
            let offset = match e.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            from.add_partition_offset(topic, e.partition(), offset)?;
        }
        reader.assign(&from)?;
        let (mut eof, mut records) = (BTreeSet::new(), 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while eof.len() < partitions && Instant::now() < deadline {
            match reader.poll(Duration::from_millis(200)) {
                Some(Ok(_)) => records += 1,
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    eof.insert(p);
                }
                _ => {}
            }
        }
        Ok(if eof.len() < partitions {
            records.max(1)
        } else {
            records
        })
    }

    /// Waits until the group is done with everything sent to it: every input and control message
    /// committed, nothing waiting on the internal shard topic (with more than one instance the inputs can
    /// all be committed while events still wait there for the instance that holds their shard), and no
    /// transaction open on the output topics (the group's offsets and the outputs' commit markers are
    /// written separately). With several instances that must hold twice, a second apart (a rebalance can
    /// hand work back between two looks). Returns when it was first seen; fails at once if an instance
    /// exits.
    pub fn wait_done(&self, alive: &mut [&mut Child], timeout: Duration) -> Instant {
        let started = Instant::now();
        let shard_topic = stitcher::config::Config::from_toml_file(&self.config_path)
            .expect("config")
            .shard_topic();
        let outputs = [&self.output_topic, &self.dlq_topic, &self.identity_topic];
        let looks = if alive.len() > 1 { 2 } else { 1 };
        let mut done_since: Option<Instant> = None;
        let mut calm = 0;
        while calm < looks {
            for child in alive.iter_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("an instance exited ({status})\n{}", self.log_tail());
                }
            }
            let (committed, total) = self.progress();
            assert!(
                started.elapsed() < timeout,
                "not done after {timeout:?}: {committed}/{total} committed\n{}",
                self.stuck_report(alive)
            );
            let done = committed >= total
                && total > 0
                && open_transactions(&outputs.map(String::as_str)) == 0
                && self.backlog(&shard_topic).unwrap_or(1) == 0;
            if done {
                calm += 1;
                done_since.get_or_insert_with(Instant::now);
            } else {
                calm = 0;
                done_since = None;
            }
            if calm < looks {
                std::thread::sleep(Duration::from_millis(if done { 1000 } else { 250 }));
            }
        }
        done_since.unwrap_or_else(Instant::now)
    }

    /// [`Setup::wait_done`] for one instance.
    pub fn wait_caught_up(&self, child: &mut Child, timeout: Duration) {
        self.wait_done(&mut [child], timeout);
    }

    /// Every committed record of the output topic, decoded, and its compacted view.
    pub fn output(&self) -> Output {
        let codec = AvroCodec::profile_update().expect("schema");
        let mut out = Output::default();
        for r in read_all(&self.output_topic) {
            let key = String::from_utf8(r.key.expect("keyed")).expect("utf8 key");
            let value = r.payload.map(|p| {
                codec
                    .decode_confluent::<ProfileUpdate>(&p)
                    .expect("valid avro")
                    .1
            });
            out.view.insert(key.clone(), value.clone());
            out.records.push((key, value));
        }
        out
    }

    pub fn dead_letters(&self) -> Vec<Record> {
        read_all(&self.dlq_topic)
    }

    /// The identifier-to-profile mapping rebuilt from the identity change stream alone (partition by
    /// partition; a profile id's records are in one partition), checking that versions increase.
    pub fn identity_mapping(&self) -> BTreeMap<(String, String), String> {
        let mut mapping = stitcher::codec::identity::Mapping::default();
        for r in read_all(&self.identity_topic) {
            let change = stitcher::codec::identity::IdentityChange::decode(
                &r.payload.expect("identity records are never tombstones"),
            )
            .expect("valid identity change");
            assert_eq!(r.key.as_deref(), Some(change.profile_id.as_bytes()));
            mapping.apply(change).unwrap_or_else(|e| panic!("{e}"));
        }
        mapping
            .identifiers()
            .into_iter()
            .map(|(i, p)| ((i.kind, i.value), p))
            .collect()
    }
}

impl Output {
    /// The identifier-to-profile mapping of the live profiles.
    pub fn identity_mapping(&self) -> BTreeMap<(String, String), String> {
        self.live()
            .into_iter()
            .flat_map(|u| {
                u.profile
                    .iter()
                    .flat_map(|p| p.identifiers.iter())
                    .map(|i| ((i.kind.clone(), i.value.clone()), u.profile_id.clone()))
            })
            .collect()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // A panicking test must not leave its service running against the shared broker. Only pids whose
        // command line still names this setup's config are ours (pids get reused).
        let config = self.config_path.to_string_lossy().into_owned();
        for pid in self.pids.borrow().iter() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&config) {
                // SAFETY: plain kill(2) on a child of this process.
                unsafe {
                    libc::kill(*pid as i32, libc::SIGKILL);
                }
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The `[inputs.fields]` of a till writing Avro `Sale` records (receipt, at, card, total, currency).
pub const TILL_FIELDS: &str = r#"[inputs.fields]
event_id = "receipt"
timestamp = "at"
default_event_type = "purchase"
amount = "total"
currency = "currency"
identifiers = [{ type = "loyalty_id", path = "card" }]
"#;

pub fn create_topics(topics: &[String], partitions: i32) {
    stitcher::generate::create_topics(&brokers(), topics, partitions).expect("create topics");
}

/// Runs `call` with an admin client of the harness's broker, on a runtime of its own.
fn with_admin<T, F: std::future::Future<Output = T>>(
    call: impl FnOnce(rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>) -> F,
) -> T {
    let admin = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(call(admin))
}

pub fn delete_topics(topics: &[String]) {
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let results = with_admin(|admin| async move {
        admin
            .delete_topics(&names, &rdkafka::admin::AdminOptions::new())
            .await
    });
    for r in results.expect("delete topics") {
        r.unwrap_or_else(|(topic, code)| panic!("delete {topic}: {code}"));
    }
}

/// Sets the topic configuration of `topic` to `settings` (all of it: what is not named returns to the
/// broker's default).
pub fn set_topic_config(topic: &str, settings: &[(&str, &str)]) {
    use rdkafka::admin::{AdminOptions, AlterConfig, ResourceSpecifier};
    let alter = settings.iter().fold(
        AlterConfig::new(ResourceSpecifier::Topic(topic)),
        |alter, (k, v)| alter.set(k, v),
    );
    let results =
        with_admin(
            |admin| async move { admin.alter_configs(&[alter], &AdminOptions::new()).await },
        );
    for r in results.expect("alter configs") {
        r.unwrap_or_else(|(resource, code)| panic!("alter {resource:?}: {code}"));
    }
}

/// Grows each of `topics` to `total` partitions (what `kafka-topics.sh --alter --partitions` does).
pub fn add_partitions(topics: &[String], total: usize) {
    use rdkafka::admin::{AdminOptions, NewPartitions};
    let growth: Vec<NewPartitions> = topics
        .iter()
        .map(|t| NewPartitions::new(t, total))
        .collect();
    let results =
        with_admin(
            |admin| async move { admin.create_partitions(&growth, &AdminOptions::new()).await },
        );
    for r in results.expect("add partitions") {
        r.unwrap_or_else(|(topic, code)| panic!("add partitions to {topic}: {code}"));
    }
}

/// The output topic as a consumer sees it.
#[derive(Default)]
pub struct Output {
    /// Last value per key (None for a tombstone): what a compacted topic converges to.
    pub view: BTreeMap<String, Option<ProfileUpdate>>,
    /// Every committed record in partition order.
    pub records: Vec<(String, Option<ProfileUpdate>)>,
}

impl Output {
    /// The live profiles of the compacted view (not redirects, not tombstones).
    pub fn live(&self) -> Vec<&ProfileUpdate> {
        self.view
            .values()
            .flatten()
            .filter(|u| u.redirect_to.is_none())
            .collect()
    }

    /// The records that are here and were not in `before`. Records are read partition by partition, so
    /// new records are not a suffix when the topic has more than one partition.
    pub fn since(&self, before: &Output) -> Vec<(String, Option<ProfileUpdate>)> {
        let mut old = before.records.clone();
        self.records
            .iter()
            .filter(|r| match old.iter().position(|o| o == *r) {
                Some(i) => {
                    old.swap_remove(i);
                    false
                }
                None => true,
            })
            .cloned()
            .collect()
    }

    /// Committed update records that repeat an earlier (profile, triggering event) pair. A replay after a
    /// crash that leaked into committed output would show up here.
    pub fn duplicates(&self) -> usize {
        let mut seen = std::collections::HashSet::new();
        self.records
            .iter()
            .filter_map(|(key, v)| {
                let u = v.as_ref()?;
                let trigger = u.trigger_event_id.clone()?;
                Some((key.clone(), trigger, u.redirect_to.is_some()))
            })
            .filter(|k| !seen.insert(k.clone()))
            .count()
    }
}

pub use stitcher::kafka::reader::Record;

/// Partitions of `topics` whose last stable offset is behind their high watermark: a transaction is open
/// there, or its commit marker is not written yet. Errors count as open.
pub fn open_transactions(topics: &[&str]) -> usize {
    let client = |isolation: &str| -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("isolation.level", isolation)
            .create()
            .expect("consumer")
    };
    let (committed, uncommitted) = (client("read_committed"), client("read_uncommitted"));
    let timeout = Duration::from_secs(10);
    let mut open = 0;
    for topic in topics {
        let Ok(md) = uncommitted.fetch_metadata(Some(topic), timeout) else {
            return 1;
        };
        for p in md
            .topics()
            .first()
            .map(|t| t.partitions())
            .unwrap_or_default()
        {
            let stable = committed.fetch_watermarks(topic, p.id(), timeout);
            let high = uncommitted.fetch_watermarks(topic, p.id(), timeout);
            match (stable, high) {
                (Ok((_, stable)), Ok((_, high))) if stable >= high => {}
                _ => open += 1,
            }
        }
    }
    open
}

/// Every committed record of a topic, partition by partition.
pub fn read_all(topic: &str) -> Vec<Record> {
    stitcher::kafka::reader::read_committed(&brokers(), topic, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("reading {topic}: {e}"))
}

/// A live profile reduced to what the ground truth can say about it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Summary {
    pub identifiers: BTreeSet<(String, String)>,
    pub events: u64,
    pub purchases: BTreeMap<String, (u64, i64)>,
    pub channels: BTreeMap<String, u64>,
    /// The timeline, switchpoints, errand, top categories and preferences.
    pub story: StoryTruth,
}

pub fn truth_summaries(truth: &[PersonTruth]) -> Vec<Summary> {
    let mut v: Vec<Summary> = truth
        .iter()
        .map(|t| Summary {
            identifiers: t.identifiers.clone(),
            events: t.events,
            purchases: t.purchases.clone(),
            channels: t.channels.clone(),
            story: t.story.clone(),
        })
        .collect();
    v.sort();
    v
}

/// What the ground truth can say of a profile's story.
fn story_of(p: &ProfileRecord) -> StoryTruth {
    StoryTruth {
        timeline: p.timeline.iter().map(|i| i.event_id.clone()).collect(),
        switch_counts: p
            .switch_counts
            .iter()
            .map(|c| (format!("{}>{}", c.from, c.to), c.count as u64))
            .collect(),
        errand: p
            .errand
            .as_ref()
            .map(|e| (e.channel.clone(), e.reason.clone(), e.open)),
        top_categories: p
            .top_categories
            .iter()
            .map(|c| (c.value.clone(), c.count as u64))
            .collect(),
        preferences: p.preferences.clone(),
        traits: p
            .traits
            .iter()
            .map(|t| {
                let mut values: Vec<(String, i64)> = t
                    .values
                    .iter()
                    .map(|c| (c.value.clone(), c.count))
                    .collect();
                if t.kind == "distinct" {
                    values.sort();
                }
                let value = journeys::render_trait(t.count, t.number, t.text.as_deref(), &values);
                (t.name.clone(), value)
            })
            .collect(),
    }
}

/// A run's output against the truth of the journeys it was given.
pub struct Verdict {
    /// Committed update records that repeat an earlier (profile, triggering event) pair.
    pub duplicates: usize,
    /// The live profiles, and the persons they should be.
    pub got: Vec<Summary>,
    pub want: Vec<Summary>,
    /// Events of the input missing from the profiles (negative: counted twice).
    pub lost: i64,
}

impl Verdict {
    /// Exactly once: no committed update repeated, no input event missing or counted twice, and the live
    /// profiles are the persons.
    pub fn assert_exactly_once(&self) {
        assert_eq!(self.duplicates, 0, "committed output records repeated");
        assert_eq!(self.lost, 0, "events missing from the profiles");
        assert!(self.got == self.want, "{}", diff(&self.got, &self.want));
    }
}

pub fn verdict(out: &Output, j: &stitcher::journeys::Journeys) -> Verdict {
    let got = live_summaries(&out.view);
    let applied: u64 = got.iter().map(|s| s.events).sum();
    Verdict {
        duplicates: out.duplicates(),
        lost: j.events as i64 - applied as i64,
        want: truth_summaries(&j.truth),
        got,
    }
}

/// The live profiles of a compacted view; checks that every redirect leads to a live profile.
pub fn live_summaries(view: &BTreeMap<String, Option<ProfileUpdate>>) -> Vec<Summary> {
    let mut out = Vec::new();
    for (key, value) in view {
        let Some(u) = value else { continue };
        assert_eq!(&u.profile_id, key, "record keyed by its profile id");
        match (&u.profile, &u.redirect_to) {
            (Some(p), None) => out.push(Summary {
                identifiers: p
                    .identifiers
                    .iter()
                    .map(|i| (i.kind.clone(), i.value.clone()))
                    .collect(),
                events: p.events as u64,
                purchases: p
                    .purchases
                    .iter()
                    .map(|x| {
                        (
                            format!("{}/{}", x.venue, x.currency),
                            (x.orders as u64, x.revenue_minor),
                        )
                    })
                    .collect(),
                channels: p
                    .channels
                    .iter()
                    .map(|c| (c.channel.clone(), c.events as u64))
                    .collect(),
                story: story_of(p),
            }),
            (None, Some(_)) => {
                let mut target = key.clone();
                for _ in 0..64 {
                    match view.get(&target) {
                        Some(Some(ProfileUpdate {
                            redirect_to: Some(next),
                            ..
                        })) => target = next.clone(),
                        _ => break,
                    }
                }
                let landed = view.get(&target).cloned().flatten();
                assert!(
                    landed.is_some_and(|u| u.profile.is_some()),
                    "redirect from {key} does not lead to a live profile"
                );
            }
            other => panic!("record {key} is neither a profile nor a redirect: {other:?}"),
        }
    }
    out.sort();
    out
}

/// Compares two sorted lists of summaries and describes the first differences.
pub fn diff(got: &[Summary], want: &[Summary]) -> String {
    let g: BTreeSet<&Summary> = got.iter().collect();
    let w: BTreeSet<&Summary> = want.iter().collect();
    let extra: Vec<_> = g.difference(&w).take(3).collect();
    let missing: Vec<_> = w.difference(&g).take(3).collect();
    format!(
        "{} profiles, {} persons; unexpected: {extra:#?}\nmissing: {missing:#?}",
        got.len(),
        want.len()
    )
}

pub fn kill9(child: &mut Child) {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
}

/// The child's exit status if it exits within `timeout`; otherwise it is killed and `None` returned.
pub fn exit_within(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        if started.elapsed() > timeout {
            kill9(child);
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How a child ended and what it wrote ([`finish_within`]).
pub struct Finished {
    /// Its exit status; `None` if it was killed at the bound.
    pub status: Option<std::process::ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    /// From the call to its end.
    pub took: Duration,
}

/// Waits for `child` to exit within `timeout` ([`exit_within`]), reading its piped stdout and stderr
/// meanwhile (so that a full pipe never holds it up; empty where not piped).
pub fn finish_within(mut child: Child, timeout: Duration) -> Finished {
    fn drain<R: std::io::Read + Send + 'static>(
        pipe: Option<R>,
    ) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let mut bytes = Vec::new();
                pipe.read_to_end(&mut bytes)
                    .expect("read the child's output");
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
            text
        })
    }
    let started = Instant::now();
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = exit_within(&mut child, timeout);
    Finished {
        status,
        took: started.elapsed(),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Runs `command` ([`finish_within`], its stderr piped) when it must fail: its stderr and how long it took.
/// Panics, showing the stderr, if it was still running at the bound or succeeded.
pub fn failed_within(command: &mut Command, timeout: Duration) -> (String, Duration) {
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the command");
    let Finished {
        status,
        stderr,
        took,
        ..
    } = finish_within(child, timeout);
    let status = status.unwrap_or_else(|| panic!("still running after {timeout:?}:\n{stderr}"));
    assert!(!status.success(), "{stderr}");
    (stderr, took)
}

pub fn sigterm(child: &mut Child) -> std::process::ExitStatus {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    child.wait().expect("wait")
}

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// The till of the registry tests: Avro `Sale` records in its own schema, through a Schema Registry.

pub fn registry_url() -> String {
    std::env::var("TEST_REGISTRY_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:18081/apis/ccompat/v7".into())
}

pub fn registry() -> Registry {
    Registry::new(&RegistryConfig {
        url: registry_url(),
        ..Default::default()
    })
    .expect("registry client")
}

pub fn registry_toml() -> String {
    format!("\n[registry]\nurl = \"{}\"\n", registry_url())
}

/// An Avro input of the till's own schema, read through [`TILL_FIELDS`].
pub fn till_input(topic: &str) -> String {
    format!(
        "\n[[inputs]]\ntopic = \"{topic}\"\nchannel = \"pos\"\nformat = \"avro\"\n{TILL_FIELDS}"
    )
}

pub const SALE_V1: &str = r#"{"type": "record", "name": "Sale", "namespace": "till", "fields": [
    {"name": "receipt", "type": "string"},
    {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "card", "type": "string"},
    {"name": "total", "type": "double"}]}"#;

pub fn framed(id: u32, schema: &str, value: apache_avro::types::Value) -> Vec<u8> {
    let schema = apache_avro::Schema::parse_str(schema).expect("schema");
    let body = apache_avro::to_avro_datum(&schema, value).expect("avro");
    [&[0u8][..], &id.to_be_bytes(), &body].concat()
}

/// A sale of 3.00 with loyalty card `card` in the till's schema v1.
pub fn sale(receipt: &str, at: i64, card: &str) -> apache_avro::types::Value {
    use apache_avro::types::Value as A;
    A::Record(vec![
        ("receipt".to_string(), A::String(receipt.into())),
        ("at".to_string(), A::TimestampMillis(at)),
        ("card".to_string(), A::String(card.into())),
        ("total".to_string(), A::Double(3.0)),
    ])
}

/// The sum of the Prometheus samples of `text` whose line starts with `line_start` (a metric name, with
/// labels if given).
pub fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(line_start))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One record to `topic`, delivered: its partition and offset.
pub fn send_one(topic: &str, payload: &[u8]) -> (i32, i64) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .expect("producer");
        producer
            .send(
                FutureRecord::<(), [u8]>::to(topic).payload(payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("delivered")
    })
}

/// Records to `topic`, in order, flushed.
pub fn send_all<P: AsRef<[u8]>>(topic: &str, payloads: impl IntoIterator<Item = P>) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("producer");
    for payload in payloads {
        producer
            .send(BaseRecord::<(), [u8]>::to(topic).payload(payload.as_ref()))
            .expect("send");
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

/// The Python of the venv scripts/setup.sh makes (`STITCHER_VENV`), for the scripts the tests run.
pub fn python() -> String {
    std::env::var("STITCHER_VENV")
        .map(|v| format!("{v}/bin/python"))
        .unwrap_or_else(|_| {
            format!(
                "{}/.cache/stitcher/venv/bin/python",
                std::env::var("HOME").unwrap_or_default()
            )
        })
}
