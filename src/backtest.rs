//! `stitcher backtest`: the retained input topics (and the control topic) replayed into a temporary state
//! under candidate rules, by the same engine the service runs, with every shard held here and nothing
//! produced or committed: the live deployment's group, state and topics are only read. The result is
//! compared with the live profiles (the compacted output topic): the persons who would merge, split or
//! change profile id, the refusals per rule, and a sample of each.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::Config;
use crate::engine::{Engine, Work};
use crate::kafka::reader::outside_consumer;
use crate::metrics::Metrics;
use crate::processor::{Batch, InMessage};
use crate::quality::{mapping_from_state, mapping_from_topic, Key};
use crate::scaleout::state::ShardOverlay;
use crate::scaleout::ShardId;
use crate::store::Store;

/// Messages handled per overlay written to the temporary state.
const BATCH: usize = 5_000;

/// What a back-test found.
#[derive(Debug, Serialize)]
pub struct Report {
    pub messages: u64,
    pub events_applied: u64,
    pub seconds: f64,
    pub messages_per_second: f64,
    pub live_profiles: usize,
    pub candidate_profiles: usize,
    /// Live profiles whose identifiers the candidate rules put in several profiles.
    pub splits: usize,
    /// Candidate profiles holding identifiers of several live profiles.
    pub merges: usize,
    /// Profiles with the same identifiers under another id.
    pub renamed: usize,
    /// Identifiers the live profiles hold and the candidate run does not (and the reverse).
    pub only_live: usize,
    pub only_candidate: usize,
    /// Links the candidate rules refused, per rule (`stitcher_merge_refusals_total` of the run).
    pub refusals: BTreeMap<String, u64>,
    /// Shared identifiers the candidate rules set apart.
    pub shared_found: u64,
    pub sample: Sample,
}

#[derive(Debug, Default, Serialize)]
pub struct Sample {
    /// Live profile id -> the candidate profile ids its identifiers went to.
    pub splits: BTreeMap<String, BTreeSet<String>>,
    /// Candidate profile id -> the live profile ids it joins.
    pub merges: BTreeMap<String, BTreeSet<String>>,
    /// Live profile id -> candidate profile id.
    pub renamed: BTreeMap<String, String>,
}

/// Replays the inputs of `cfg` (its rules being the candidate's) into a temporary state in `dir`, and
/// compares with the live profiles of `cfg.output.topic`. `range`: replay from the first record at or
/// after that time (Kafka timestamps) instead of from the beginning, and up to the last one at or before
/// that time instead of the end; `sample`: examples kept per kind.
pub fn run(
    mut cfg: Config,
    dir: &std::path::Path,
    range: (Option<i64>, Option<i64>),
    sample: usize,
    timeout: Duration,
) -> anyhow::Result<Report> {
    cfg.state.dir = dir.to_path_buf();
    let store = Store::open(dir, cfg.state.block_cache_mb).context("temporary state")?;
    let shards: Vec<ShardId> = (0..cfg.scaleout.shards).collect();
    store.put_shard_count(cfg.scaleout.shards)?;
    let metrics = Metrics::new()?;
    let mut engine = Engine::new(&cfg, metrics.clone())?;
    engine.hold_every_shard();

    let started = Instant::now();
    let messages = replay(&cfg, &store, &engine, &shards, range, timeout)?;
    let seconds = started.elapsed().as_secs_f64();

    let candidate = mapping_from_state(&store)?;
    let live = mapping_from_topic(crate::kafka::base_config(&cfg), &cfg.output.topic, timeout)
        .with_context(|| format!("reading the live profiles of {}", cfg.output.topic))?;
    let mut report = compare(&live, &candidate, sample);
    report.messages = messages;
    report.seconds = seconds;
    report.messages_per_second = messages as f64 / seconds.max(1e-9);
    report.events_applied = metrics_sum(&metrics, "stitcher_events_applied_total");
    report.refusals = metrics_by_label(&metrics, "stitcher_merge_refusals_total", "rule");
    report.shared_found = metrics.shared_identifiers.get();
    Ok(report)
}

/// Reads every input partition (and the control topic's) from the start (or the range's start) to its end
/// as of the start (or its first record after the range's end), through the engine, one overlay per
/// [`BATCH`] messages written to `store`.
fn replay(
    cfg: &Config,
    store: &Store,
    engine: &Engine,
    shards: &[ShardId],
    (from_ms, until_ms): (Option<i64>, Option<i64>),
    timeout: Duration,
) -> anyhow::Result<u64> {
    let consumer = outside_consumer(&mut crate::kafka::base_config(cfg), "backtest")?;
    let mut topics: Vec<&str> = cfg.inputs.iter().map(|i| i.topic.as_str()).collect();
    if !cfg.control.topic.is_empty() {
        topics.push(&cfg.control.topic);
    }
    let wait = Duration::from_secs(10);
    // Where each partition ends now: the replay stops there.
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for topic in &topics {
        let md = consumer.fetch_metadata(Some(topic), wait)?;
        let Some(t) = md.topics().first().filter(|t| t.error().is_none()) else {
            continue;
        };
        for p in t.partitions() {
            let (low, high) = crate::kafka::watermarks(&consumer, topic, p.id(), wait)?;
            if high > low {
                ends.insert((topic.to_string(), p.id()), high);
                let start = match from_ms {
                    Some(ms) => Offset::Offset(ms),
                    None => Offset::Beginning,
                };
                tpl.add_partition_offset(topic, p.id(), start)?;
            }
        }
    }
    if from_ms.is_some() {
        tpl = consumer.offsets_for_times(tpl, wait)?;
        // A partition with nothing at or after the time has nothing to replay.
        for e in tpl.elements() {
            if matches!(e.offset(), Offset::End | Offset::Invalid) {
                ends.remove(&(e.topic().to_string(), e.partition()));
            }
        }
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + timeout;
    let mut messages = 0u64;
    let mut positions = shards.iter().map(|s| (*s, 0i64)).collect::<Vec<_>>();
    while !ends.is_empty() {
        let mut overlay = ShardOverlay::new(store);
        let (mut batch, mut work) = (Batch::default(), Work::default());
        let mut taken = 0;
        while taken < BATCH && !ends.is_empty() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the replay did not reach the end of the input topics in {timeout:?}"
            );
            let m = match consumer.poll(Duration::from_millis(200)) {
                None => break,
                Some(Err(KafkaError::PartitionEOF(_))) => continue,
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(m)) => m,
            };
            let at = (m.topic().to_string(), m.partition());
            let Some(end) = ends.get(&at).copied() else {
                continue;
            };
            let after_range =
                until_ms.is_some_and(|until| m.timestamp().to_millis().is_some_and(|t| t > until));
            if m.offset() >= end || after_range {
                ends.remove(&at);
                continue;
            }
            engine
                .take(&mut overlay, &mut batch, &mut work, InMessage::of(&m))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            taken += 1;
            if m.offset() + 1 >= end {
                ends.remove(&at);
            }
        }
        // The records are not produced; building them counts merges, splits and shared identifiers.
        engine
            .output(&overlay, &mut batch, &mut work)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        store.write_shard_changes(overlay.into_changes()?, std::mem::take(&mut positions))?;
        messages += taken as u64;
    }
    Ok(messages)
}

fn metrics_sum(metrics: &Metrics, name: &str) -> u64 {
    metrics_by_label(metrics, name, "").values().sum()
}

/// A counter's values by one label (all summed under "" when `label` is empty).
fn metrics_by_label(metrics: &Metrics, name: &str, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for family in metrics.gather() {
        if family.get_name() != name {
            continue;
        }
        for m in family.get_metric() {
            let key = m
                .get_label()
                .iter()
                .find(|l| l.get_name() == label)
                .map(|l| l.get_value().to_string())
                .unwrap_or_default();
            *out.entry(key).or_insert(0) += m.get_counter().get_value() as u64;
        }
    }
    out
}

/// The differences between two identifier -> profile id mappings.
pub fn compare(
    live: &HashMap<Key, String>,
    candidate: &HashMap<Key, String>,
    sample: usize,
) -> Report {
    let group = |m: &HashMap<Key, String>| -> BTreeMap<String, BTreeSet<Key>> {
        let mut g: BTreeMap<String, BTreeSet<Key>> = BTreeMap::new();
        for (k, p) in m {
            g.entry(p.clone()).or_default().insert(k.clone());
        }
        g
    };
    let (live_groups, candidate_groups) = (group(live), group(candidate));
    // Profile ids of the other side that a profile's identifiers are in.
    let across = |ids: &BTreeSet<Key>, other: &HashMap<Key, String>| -> BTreeSet<String> {
        ids.iter().filter_map(|k| other.get(k).cloned()).collect()
    };
    let mut s = Sample::default();
    let (mut splits, mut merges, mut renamed) = (0, 0, 0);
    for (l, ids) in &live_groups {
        let to = across(ids, candidate);
        if to.len() > 1 {
            splits += 1;
            if s.splits.len() < sample {
                s.splits.insert(l.clone(), to);
            }
        } else if let Some(c) = to.into_iter().next() {
            let back = across(&candidate_groups[&c], live);
            if back.len() == 1 && c != *l {
                renamed += 1;
                if s.renamed.len() < sample {
                    s.renamed.insert(l.clone(), c);
                }
            }
        }
    }
    for (c, ids) in &candidate_groups {
        let from = across(ids, live);
        if from.len() > 1 {
            merges += 1;
            if s.merges.len() < sample {
                s.merges.insert(c.clone(), from);
            }
        }
    }
    Report {
        messages: 0,
        events_applied: 0,
        seconds: 0.0,
        messages_per_second: 0.0,
        live_profiles: live_groups.len(),
        candidate_profiles: candidate_groups.len(),
        splits,
        merges,
        renamed,
        only_live: live.keys().filter(|k| !candidate.contains_key(*k)).count(),
        only_candidate: candidate.keys().filter(|k| !live.contains_key(*k)).count(),
        refusals: BTreeMap::new(),
        shared_found: 0,
        sample: s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(pairs: &[(&str, &str)]) -> HashMap<Key, String> {
        pairs
            .iter()
            .map(|(v, p)| (("email".to_string(), v.to_string()), p.to_string()))
            .collect()
    }

    #[test]
    fn splits_merges_and_renames_are_told_apart() {
        let live = mapping(&[
            ("a", "L1"),
            ("b", "L1"),
            ("c", "L2"),
            ("d", "L3"),
            ("e", "L4"),
            ("x", "L5"),
        ]);
        let candidate = mapping(&[
            ("a", "C1"),
            ("b", "C2"),
            ("c", "C3"),
            ("d", "C3"),
            ("e", "L4"),
            ("y", "C9"),
        ]);
        let r = compare(&live, &candidate, 10);
        assert_eq!((r.splits, r.merges, r.renamed), (1, 1, 0));
        assert_eq!(
            r.sample.splits["L1"],
            BTreeSet::from(["C1".to_string(), "C2".to_string()])
        );
        assert_eq!(
            r.sample.merges["C3"],
            BTreeSet::from(["L2".to_string(), "L3".to_string()])
        );
        assert_eq!((r.only_live, r.only_candidate), (1, 1));
        let renamed = compare(&mapping(&[("a", "L1")]), &mapping(&[("a", "C1")]), 10);
        assert_eq!(renamed.renamed, 1);
        assert_eq!(renamed.sample.renamed["L1"], "C1");
    }
}
