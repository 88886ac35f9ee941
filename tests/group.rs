//! A second instance started in the same consumer group (by mistake, or to scale out) shares the work and
//! never splits the identity graph: with the default single shard, one instance holds the shard and the
//! other hands its input partitions' events to it through the shard topic. The second is killed with
//! SIGKILL half way; the first takes everything over and ends exactly at the truth.
#![cfg(feature = "kafka-it")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use stitcher::generate;
use stitcher::journeys::{self, JourneyConfig};

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_second_instance_in_the_group_shares_the_work_without_splitting_the_graph() {
    let s = Setup::new("group", 4, "");
    let j = journeys::generate(&JourneyConfig {
        persons: 2000,
        seed: 41,
        shuffle_window: 100,
        ..Default::default()
    });
    generate::send(&brokers(), &s.routes, &j, 0).expect("send");
    let mut first = s.start();
    wait_for(
        "the first instance to commit",
        Duration::from_secs(60),
        || s.progress().0 > 0,
    );

    // The same group, another instance name, its own state directory and HTTP port.
    let port = free_port();
    let second_state = s.dir.join("second-state");
    let mut second = s.start_with_env(&[
        ("STITCHER_INSTANCE_ID", "second"),
        ("STITCHER_STATE_DIR", &second_state.to_string_lossy()),
        ("STITCHER_HTTP_LISTEN", &format!("127.0.0.1:{port}")),
    ]);
    let joined = s.progress().0;
    wait_for(
        "both instances to commit after the second joined",
        Duration::from_secs(90),
        || s.progress().0 > joined && s.log().matches("partitions assigned").count() >= 2,
    );
    let shared = s.progress().0;
    kill9(&mut second);
    // The events the first sent to the shard while the second held it wait on the shard topic until the
    // first takes the shard back: done means that topic is drained too.
    s.wait_caught_up(&mut first, Duration::from_secs(180));
    assert!(sigterm(&mut first).success(), "{}", s.log_tail());

    let out = s.output();
    let got = live_summaries(&out.view);
    let want = truth_summaries(&j.truth);
    assert!(got == want, "{}", diff(&got, &want));
    assert_eq!(out.duplicates(), 0);
    println!(
        "group: second instance joined at {joined}/{total} committed, killed at {shared}/{total}; the first \
         took over and ended at the truth ({} profiles, 0 duplicates)",
        got.len(),
        total = s.progress().1,
    );
}

/// A transaction whose offsets the group coordinator refuses (the group rebalanced after they were taken)
/// is aborted before the refusal is reported. Left open, its records held the last stable offset of every
/// partition it wrote to, and a restore reading the changelog `read_committed` right after the rejoin
/// waited for the transaction timeout (60 s by default): the flake of the test above.
#[test]
fn a_commit_refused_for_a_rebalance_leaves_no_transaction_open() {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use stitcher::config::Config;
    use stitcher::kafka::committer::{CommitError, Committer, Deadline};
    use stitcher::metrics::Metrics;
    use stitcher::store::{OutRecord, Position};
    use tokio_util::sync::CancellationToken;

    let input = unique("refused-in");
    let out = unique("refused-out");
    create_topics(&[input.clone(), out.clone()], 2);
    let group = unique("refused-group");
    let member = |name: &str| -> BaseConsumer {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", &group)
            .set("client.id", name)
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .create()
            .expect("consumer");
        c.subscribe(&[&input]).expect("subscribe");
        c
    };
    let holds = |c: &BaseConsumer| c.assignment().map(|a| a.count()).unwrap_or(0);
    let first = member("first");
    wait_for(
        "the first member's partitions",
        Duration::from_secs(30),
        || {
            first.poll(Duration::from_millis(100));
            holds(&first) == 2
        },
    );
    let stale = std::sync::Arc::new(first.group_metadata().expect("group metadata"));
    // A second member joins: the group's generation moves on, and `stale` with it.
    let second = member("second");
    wait_for(
        "the group to share the partitions",
        Duration::from_secs(30),
        || {
            first.poll(Duration::from_millis(100));
            second.poll(Duration::from_millis(100));
            holds(&first) == 1 && holds(&second) == 1
        },
    );

    let mut cfg = Config::default();
    cfg.kafka.brokers = brokers();
    cfg.kafka.transactional_id = unique("refused-txn");
    let deadline = Deadline::new(CancellationToken::new(), Duration::from_secs(20));
    let mut committer = Committer::new(&cfg, "first", Metrics::new().expect("metrics"), &deadline)
        .expect("producer");
    // Enough records that some are written while the offsets are refused (a handful would still be queued
    // then, and purged unwritten).
    cfg.kafka.producer.insert("linger.ms".into(), "0".into());
    let records: Vec<OutRecord> = (0..3000)
        .map(|i| OutRecord {
            topic: out.clone(),
            partition: Some(i % 2),
            key: Some(format!("k{i}").into_bytes()),
            payload: Some(vec![b'v'; 1000]),
            headers: Vec::new(),
        })
        .collect();
    let position = Position {
        topic: input.clone(),
        partition: 0,
        next_offset: 1,
    };
    let records: Vec<_> = records.iter().map(OutRecord::borrowed).collect();
    let refused = committer.commit(&records, &[position], Some(&stale), &deadline);
    assert!(
        matches!(refused, Err(CommitError::Rejoin(_))),
        "offsets of a former generation were not refused: {refused:?}"
    );
    // The abort's markers are written within moments; an open transaction would stay for a minute.
    wait_for(
        "the refused transaction to be over",
        Duration::from_secs(10),
        || open_transactions(&[&out]) == 0,
    );
}

/// Subscribes `consumer` to `topic` (of one partition) and polls until the partition is assigned to it.
fn join_for_one_partition(consumer: &rdkafka::consumer::BaseConsumer, topic: &str, what: &str) {
    use rdkafka::consumer::Consumer;
    consumer.subscribe(&[topic]).expect("subscribe");
    wait_for(what, Duration::from_secs(30), || {
        consumer.poll(Duration::from_millis(100));
        consumer.assignment().map(|a| a.count()).unwrap_or(0) == 1
    });
}

/// A producer with a transactional id of its own (`name`, made unique), its transactions initialised.
fn transactional_producer(
    name: &str,
) -> rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext> {
    use rdkafka::producer::{Producer, ThreadedProducer};
    let producer: ThreadedProducer<_> = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("transactional.id", unique(name))
        .create()
        .expect("producer");
    producer
        .init_transactions(Duration::from_secs(20))
        .expect("init");
    producer
}

/// What a shard's new owner relies on (DESIGN, "Restore"): the changelog end a `read_committed` client is
/// told stops before an open transaction's records (so the restore reads to the high watermark, which a
/// `read_uncommitted` client is told); a transaction that also commits an offset of the shard topic's
/// partition, even the offset already committed, holds the new owner's stable offset fetch until it is over.
#[test]
fn a_pending_offset_commit_holds_a_stable_fetch_until_its_transaction_ends() {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{BaseRecord, Producer};
    use rdkafka::{Offset, TopicPartitionList};

    let shards = unique("pending-shards");
    let changelog = unique("pending-changelog");
    create_topics(&[shards.clone(), changelog.clone()], 1);
    let group = unique("pending-group");
    let consumer = |extra: &[(&str, &str)]| -> BaseConsumer {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", brokers())
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed");
        for (k, v) in extra {
            c.set(*k, *v);
        }
        c.create().expect("consumer")
    };
    let owner = consumer(&[("session.timeout.ms", "6000")]);
    join_for_one_partition(&owner, &shards, "the owner's partition");
    let producer = transactional_producer("pending-txn");
    let timeout = Duration::from_secs(20);
    let mut unchanged = TopicPartitionList::new();
    unchanged
        .add_partition_offset(&shards, 0, Offset::Offset(0))
        .expect("tpl");
    let metadata = owner.group_metadata().expect("group metadata");
    // The offset is committed once, so that the pending one below changes nothing.
    producer.begin_transaction().expect("begin");
    producer
        .send_offsets_to_transaction(&unchanged, &metadata, timeout)
        .expect("offsets");
    producer.commit_transaction(timeout).expect("commit");

    let newcomer = consumer(&[]);
    let ask = || {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&shards, 0);
        newcomer.committed_offsets(tpl, Duration::from_secs(30))
    };
    let open_with_record = || {
        producer.begin_transaction().expect("begin");
        producer
            .send(
                BaseRecord::to(&changelog)
                    .partition(0)
                    .key("k")
                    .payload("v"),
            )
            .map_err(|(e, _)| e)
            .expect("send");
        producer.flush(timeout).expect("flush");
    };

    // A transaction that writes the changelog and commits no offset of the shard: the fetch does not wait,
    // and the end a read_committed restore reads to is before its record.
    open_with_record();
    let t = Instant::now();
    ask().expect("committed offsets");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "waited {:?}",
        t.elapsed()
    );
    let (_, end) = newcomer
        .fetch_watermarks(&changelog, 0, timeout)
        .expect("watermarks");
    assert_eq!(
        end, 0,
        "a read_committed client is told the end before the open transaction"
    );
    let log_end = stitcher::kafka::progress_reader(&brokers(), &group)
        .expect("read_uncommitted client")
        .fetch_watermarks(&changelog, 0, timeout)
        .expect("watermarks")
        .1;
    assert_eq!(
        log_end, 1,
        "a read_uncommitted client is told the log's end"
    );
    producer.commit_transaction(timeout).expect("commit");

    // The same with the shard's offset, unchanged, in the transaction: the fetch waits until it commits.
    open_with_record();
    producer
        .send_offsets_to_transaction(&unchanged, &metadata, timeout)
        .expect("offsets");
    let held = Duration::from_secs(3);
    let (asked, answered) = std::thread::scope(|scope| {
        let fetch = scope.spawn(|| {
            let t = Instant::now();
            let got = ask().expect("committed offsets");
            (t, got, Instant::now())
        });
        std::thread::sleep(held);
        producer.commit_transaction(timeout).expect("commit");
        let (t, got, done) = fetch.join().expect("fetch");
        let offset = got.find_partition(&shards, 0).map(|e| e.offset());
        assert_eq!(offset, Some(Offset::Offset(0)));
        (t, done)
    });
    assert!(
        answered.duration_since(asked) >= held - Duration::from_millis(500),
        "the stable fetch returned after {:?}, while the transaction was open",
        answered.duration_since(asked)
    );
    let (_, end) = newcomer
        .fetch_watermarks(&changelog, 0, timeout)
        .expect("watermarks");
    assert!(
        end >= 4,
        "both transactions' records and markers are below the end: {end}"
    );
}

/// A killed owner's open transaction does not hide what was committed after it (DESIGN, "Restore"): the
/// shard's owner commits past a transaction that a killed process left open on the changelog, and a fresh
/// instance that takes the shard over (the same static member, an empty state directory) restores it to the
/// log's end once that transaction is aborted, not to the last stable offset it held back. It then answers
/// every lookup as the owner did. Stopped while it waits in the restore, it exits as asked.
#[test]
fn a_restore_reads_past_a_killed_owners_open_transaction() {
    use rdkafka::producer::{BaseRecord, Producer};

    let s = Setup::new("zombie", 2, "");
    let j = journeys::generate(&JourneyConfig {
        persons: 300,
        seed: 43,
        ..Default::default()
    });
    let half = j.messages.len() / 2;
    let part = |skip: usize, take: usize| {
        journeys::Journeys::of_messages(j.messages.iter().skip(skip).take(take).cloned().collect())
    };
    let timeout = Duration::from_secs(120);
    generate::send(&brokers(), &s.routes, &part(0, half), 0).expect("send");
    let mut owner = s.start();
    s.wait_caught_up(&mut owner, timeout);

    // A process that wrote to the changelog in a transaction and died: nothing ends the transaction until
    // the coordinator's timeout (here, the test's abort below).
    let changelog = stitcher::config::Config::from_toml_file(&s.config_path)
        .expect("config")
        .changelog_topic();
    let zombie = transactional_producer("zombie-txn");
    let call = Duration::from_secs(20);
    zombie.begin_transaction().expect("begin");
    zombie
        .send(
            BaseRecord::to(&changelog)
                .partition(0)
                .key(&b"never applied"[..])
                .payload(&b"aborted"[..]),
        )
        .map_err(|(e, _)| e)
        .expect("send");
    zombie.flush(call).expect("flush");

    // The owner goes on and commits after the open transaction's record.
    generate::send(&brokers(), &s.routes, &part(half, usize::MAX), 0).expect("send");
    s.wait_caught_up(&mut owner, timeout);
    let emails: Vec<String> = j
        .truth
        .iter()
        .filter_map(|p| p.identifiers.iter().find(|(k, _)| k == "email"))
        .map(|(_, v)| v.clone())
        .collect();
    let answers = |what: &str| -> Vec<(String, u16, serde_json::Value)> {
        emails
            .iter()
            .map(|e| {
                let (status, body) = s.http_get(&format!("/v1/identifiers/email/{e}"));
                let v = serde_json::from_str(&body).unwrap_or_else(|_| body.clone().into());
                assert_ne!(status, 503, "{what}: lookup of {e} while restoring");
                (e.clone(), status, v)
            })
            .collect()
    };
    let want = answers("the owner");
    assert!(sigterm(&mut owner).success(), "{}", s.log_tail());

    // The same static member on an empty state directory: it restores the shard from the changelog.
    let state = s.dir.join("fresh-state");
    let restores = || s.log().matches("shards restored").count();
    let before = restores();
    let start_fresh = || s.start_with_env(&[("STITCHER_STATE_DIR", &state.to_string_lossy())]);
    let mut fresh = start_fresh();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        restores(),
        before,
        "the restore ended while a transaction below the changelog's end was open\n{}",
        s.log_tail()
    );
    // Told to stop while it waits in the restore, it stops as asked: exit 0, not an error.
    assert!(
        sigterm(&mut fresh).success(),
        "a stop during the restore failed\n{}",
        s.log_tail()
    );
    assert!(
        s.log().contains("stopped while taking shards over"),
        "{}",
        s.log_tail()
    );
    let mut fresh = start_fresh();
    zombie.abort_transaction(call).expect("abort");
    let aborted = Instant::now();
    // Restored is logged before the shard is published to lookups and the instance reports ready.
    wait_for("the shard restored and served", timeout, || {
        if let Ok(Some(status)) = fresh.try_wait() {
            panic!("exited ({status})\n{}", s.log_tail());
        }
        restores() > before && s.http_get("/readyz").0 == 200
    });
    let restored_after = aborted.elapsed();
    s.wait_caught_up(&mut fresh, timeout);
    let got = answers("the fresh instance");
    let differing: Vec<_> = got
        .iter()
        .zip(&want)
        .filter(|(g, w)| g != w)
        .map(|(g, _)| &g.0)
        .collect();
    assert!(
        differing.is_empty(),
        "{} of {} lookups differ after the restore, e.g. {:?}",
        differing.len(),
        want.len(),
        differing.first()
    );
    println!(
        "zombie: {} lookups equal after a restore past an open transaction (restored {restored_after:?} \
         after the abort)",
        want.len(),
    );
    assert!(sigterm(&mut fresh).success(), "{}", s.log_tail());
}

/// A stop while the instance waits to take its partitions over (a previous owner's transaction holds their
/// committed offsets: the stable fetch waits until it ends, up to twice the transaction timeout) ends the
/// wait: the instance exits 0 within moments, never having reported ready.
#[test]
fn a_stop_while_waiting_for_a_previous_owners_transaction_exits_at_once() {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::Producer;
    use rdkafka::{Offset, TopicPartitionList};

    let s = Setup::new("stable-wait", 1, "");
    let topic = &s.input_topics[0];
    // A member of the service's group for a moment, whose transaction commits an offset of an input
    // partition and stays open, as a killed owner's would.
    let previous: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", &s.group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    join_for_one_partition(&previous, topic, "the previous owner's partition");
    let zombie = transactional_producer("stable-wait-txn");
    let call = Duration::from_secs(20);
    let mut offsets = TopicPartitionList::new();
    offsets
        .add_partition_offset(topic, 0, Offset::Offset(0))
        .expect("tpl");
    zombie.begin_transaction().expect("begin");
    zombie
        .send_offsets_to_transaction(
            &offsets,
            &previous.group_metadata().expect("metadata"),
            call,
        )
        .expect("offsets");
    drop(previous);

    let mut waiting = s.start();
    wait_for("the instance to join", Duration::from_secs(30), || {
        s.log().contains("partitions assigned")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_ne!(s.http_get("/readyz").0, 200, "ready while it waits");
    let asked = Instant::now();
    assert!(sigterm(&mut waiting).success(), "{}", s.log_tail());
    let stopped = asked.elapsed();
    assert!(
        stopped < Duration::from_secs(10),
        "the stop waited {stopped:?} for the open transaction\n{}",
        s.log_tail()
    );
    assert!(
        s.log().contains("stopped while taking shards over"),
        "{}",
        s.log_tail()
    );
    zombie.abort_transaction(call).expect("abort");
    println!("stable wait: stopped {stopped:?} after SIGTERM");
}
