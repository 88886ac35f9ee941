//! Benchmarks of the core, without Kafka: identifier normalisation, Avro decode/encode, and the stitch step on
//! a RocksDB store holding 1M and 10M identifiers, compared in the same run with an in-memory union-find over
//! the same stream (the upper bound: no profiles, no persistence).
//!
//! `cargo bench --bench core` runs everything; `STITCH_SIZES=1000000 cargo bench --bench core -- stitch`
//! only the stitch step at 1M. Each store size prints its preload time, resident memory and disk size.
//! `STITCH_IN_MEMORY=1` adds the same stitch step over a hash map in memory instead of RocksDB (about 1.4
//! GiB at 1M identifiers: not for 10M on a small machine).

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

mod common;

use common::{apply_batch, apply_events, event, person_identifiers, preload, Stream, BATCH};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use stitcher::codec::update::ProfileRecord;
use stitcher::codec::{AvroCodec, EventDecoder, ProfileUpdate, UpdateEncoder};
use stitcher::config::{Format, GuardrailConfig, IdentityConfig, StateConfig};
use stitcher::journeys::{self, Generated, JourneyConfig};
use stitcher::model::{Event, Identifier};
use stitcher::normalize::Normalizer;
use stitcher::scaleout::state::{Kv, KvRead};
use stitcher::stitch::{MemStore, Rules, Stitcher};
use stitcher::store::{StoreError, TempStore};

/// The allocator the service runs with (src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn sample_events(persons: usize) -> Vec<(String, stitcher::model::ChannelEvent)> {
    journeys::generate(&JourneyConfig {
        persons,
        seed: 5,
        ..Default::default()
    })
    .messages
    .into_iter()
    .filter_map(|m| match m {
        Generated::Event { channel, event, .. } => Some((channel.to_string(), event)),
        Generated::Malformed { .. } => None,
    })
    .collect()
}

fn normalisation(c: &mut Criterion) {
    let norm = Normalizer::new(&IdentityConfig::default()).expect("normalizer");
    let mut g = c.benchmark_group("normalize");
    g.throughput(Throughput::Elements(1));
    g.bench_function("email", |b| {
        b.iter(|| norm.identifier("email", black_box("  Alice.Smith+promo@Example.COM ")))
    });
    g.bench_function("phone", |b| {
        b.iter(|| norm.identifier("phone", black_box("(207) 555-0134")))
    });
    let events = sample_events(200);
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("event", |b| {
        b.iter_batched(
            || events.clone(),
            |evs| {
                for (channel, e) in evs {
                    let _ =
                        black_box(norm.event(e, &channel, stitcher::model::now_millis(), |_| {}));
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn avro(c: &mut Criterion) {
    let codec = AvroCodec::channel_event().expect("schema");
    let events = sample_events(200);
    let encoded: Vec<Vec<u8>> = events
        .iter()
        .map(|(_, e)| codec.encode(1, e).expect("encode"))
        .collect();
    let decoder = EventDecoder::new(&[1], 1 << 20).expect("decoder");
    let layout = stitcher::codec::Layout::native(Format::Avro);
    let mut g = c.benchmark_group("avro");
    g.throughput(Throughput::Elements(encoded.len() as u64));
    g.bench_function("decode_channel_event", |b| {
        b.iter(|| {
            for bytes in &encoded {
                black_box(decoder.decode(&layout, bytes).expect("decode"));
            }
        })
    });

    // A realistic profile: the largest of a generated run.
    let norm = Normalizer::new(&IdentityConfig::default()).expect("normalizer");
    let stitcher = Stitcher::new(Rules::new(&GuardrailConfig::default()));
    let mut mem = MemStore::default();
    for (channel, e) in events {
        if let Ok(ev) = norm.event(e, &channel, stitcher::model::now_millis(), |_| {}) {
            stitcher.apply(&mut mem, &ev).expect("apply");
        }
    }
    let profile = mem
        .by_public_id()
        .into_values()
        .max_by_key(|p| p.events)
        .map(|p| ProfileRecord::new(p, stitcher.enrichment()))
        .expect("a profile");
    let update = ProfileUpdate {
        profile_id: "p-0123456789abcdef0123".into(),
        redirect_to: None,
        merged_from: vec!["p-00000000000000000001".into()],
        trigger_event_id: Some("evt-1".into()),
        trigger_channel: Some("web".into()),
        updated_at: 1_767_225_600_000,
        refused_links: vec![],
        profile: Some(profile),
        split_from: None,
    };
    let encoder = UpdateEncoder::new(2).expect("encoder");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_profile_update", |b| {
        b.iter(|| black_box(encoder.encode(black_box(&update)).expect("encode")))
    });
    g.finish();
}

/// What the story costs (issue 15): applying generated events to profiles with the default enrichment and
/// the ground truth's computed traits, against the same with every story bound at zero and no traits; and
/// the bytes of the largest profile's update (Avro) and stored value (postcard) with and without its story.
fn enrichment(c: &mut Criterion) {
    use stitcher::config::Config;
    use stitcher::profile::{Enrichment, Profile, Story};
    let norm = Normalizer::new(&IdentityConfig::default()).expect("normalizer");
    let events: Vec<Event> = sample_events(200)
        .into_iter()
        .filter_map(|(channel, e)| {
            norm.event(e, &channel, stitcher::model::now_millis(), |_| {})
                .ok()
        })
        .collect();
    let with: Enrichment = toml::from_str::<Config>(journeys::TRUTH_TRAITS)
        .expect("traits")
        .enrichment;
    let without = Enrichment {
        timeline: 0,
        journey: 0,
        switchpoints: 0,
        interests_kept: 0,
        interests_top: 0,
        preferences: 0,
        errand_event_types: vec![],
        traits: vec![],
        ..Enrichment::default()
    };
    let mut g = c.benchmark_group("enrichment");
    g.throughput(Throughput::Elements(events.len() as u64));
    for (label, cfg) in [
        ("profile_apply/with_story", &with),
        ("profile_apply/without_story", &without),
    ] {
        g.bench_function(label, |b| {
            b.iter(|| {
                // One profile per first identifier: profiles grow as a person's would.
                let mut profiles: HashMap<&Identifier, Profile> = HashMap::new();
                for ev in &events {
                    profiles
                        .entry(&ev.identifiers[0])
                        .or_insert_with(Profile::empty)
                        .apply(ev, &ev.identifiers, cfg);
                }
                black_box(profiles.len())
            })
        });
    }
    g.finish();

    let stitcher = Stitcher::new(Rules::new(&GuardrailConfig::default()))
        .with_enrichment(std::sync::Arc::new(with.clone()));
    let mut mem = MemStore::default();
    for ev in &events {
        stitcher.apply(&mut mem, ev).expect("apply");
    }
    let largest = mem
        .by_public_id()
        .into_values()
        .max_by_key(|p| p.events)
        .expect("a profile")
        .clone();
    let encoder = UpdateEncoder::new(2).expect("encoder");
    let sizes = |p: &Profile| {
        let update = ProfileUpdate {
            profile_id: p.id().to_string(),
            redirect_to: None,
            merged_from: vec![],
            trigger_event_id: Some("evt-1".into()),
            trigger_channel: Some("web".into()),
            updated_at: 1_767_225_600_000,
            refused_links: vec![],
            profile: Some(ProfileRecord::new(p, &with)),
            split_from: None,
        };
        let avro = encoder.encode(&update).expect("encode").len();
        let stored = postcard::to_allocvec(p).expect("postcard").len();
        (avro, stored)
    };
    let (avro, stored) = sizes(&largest);
    let mut bare = largest.clone();
    bare.story = Story::default();
    let (avro_bare, stored_bare) = sizes(&bare);
    eprintln!(
        "enrichment: largest profile ({} events): update {avro} bytes with its story, {avro_bare} without; \
         stored {stored} bytes with, {stored_bare} without",
        largest.events
    );
}

fn rss_mib() -> f64 {
    stitcher::bench::proc_status(std::process::id(), "VmRSS:") / 1024.0
}

fn dir_size_mib(path: &std::path::Path) -> f64 {
    std::fs::read_dir(path)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum::<u64>()
        })
        .unwrap_or(0) as f64
        / (1024.0 * 1024.0)
}

/// The same records in a hash map in memory: the stitch step without RocksDB (no reads, no writes, no
/// changelog), bounding what any change to the store alone can win. Counts its keys per shard and kind,
/// which answers `has_prefix` for the prefixes the state asks about.
#[derive(Default)]
struct MemKv {
    records: HashMap<Vec<u8>, Vec<u8>, foldhash::fast::RandomState>,
    per_kind: HashMap<Vec<u8>, usize, foldhash::fast::RandomState>,
}

impl KvRead for MemKv {
    fn read_with<R>(
        &self,
        key: &[u8],
        f: impl FnOnce(Option<&[u8]>) -> R,
    ) -> Result<R, StoreError> {
        Ok(f(self.records.get(key).map(Vec::as_slice)))
    }
}

impl Kv for MemKv {
    fn set(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        let kind = key[..key.len().min(5)].to_vec();
        let count = self.per_kind.entry(kind).or_default();
        match value {
            Some(v) => {
                if self.records.insert(key, v).is_none() {
                    *count += 1;
                }
            }
            None => {
                if self.records.remove(&key).is_some() {
                    *count -= 1;
                }
            }
        };
    }

    fn known_absent(&mut self, _key: Vec<u8>) {}

    fn has_prefix(&self, prefix: &[u8]) -> Result<bool, StoreError> {
        Ok(match self.per_kind.get(prefix) {
            Some(count) => *count > 0,
            None if prefix.len() == 5 => false,
            None => self.records.keys().any(|k| k.starts_with(prefix)),
        })
    }
}

/// In-memory union-find over identifier strings: union by size, path halving.
#[derive(Default)]
struct UnionFind {
    index: HashMap<Identifier, u32>,
    parent: Vec<u32>,
    size: Vec<u32>,
}

impl UnionFind {
    fn node(&mut self, id: &Identifier) -> u32 {
        if let Some(&n) = self.index.get(id) {
            return n;
        }
        let n = self.parent.len() as u32;
        self.parent.push(n);
        self.size.push(1);
        self.index.insert(id.clone(), n);
        n
    }

    fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let grand = self.parent[self.parent[x as usize] as usize];
            self.parent[x as usize] = grand;
            x = grand;
        }
        x
    }

    fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra == rb {
            return;
        }
        let (big, small) = if self.size[ra as usize] >= self.size[rb as usize] {
            (ra, rb)
        } else {
            (rb, ra)
        };
        self.parent[small as usize] = big;
        self.size[big as usize] += self.size[small as usize];
    }

    fn apply(&mut self, ev: &Event) {
        let mut it = ev.identifiers.iter();
        if let Some(first) = it.next() {
            let root = self.node(first);
            for id in it {
                let n = self.node(id);
                self.union(root, n);
            }
        }
    }
}

/// Time spent in `apply` over `iters` batches of the stream; generating the events is not timed.
fn time_batches(iters: u64, stream: &mut Stream, mut apply: impl FnMut(&[Event])) -> Duration {
    let mut spent = Duration::ZERO;
    for _ in 0..iters {
        let events: Vec<Event> = (0..BATCH).map(|_| stream.next_event()).collect();
        let t = Instant::now();
        apply(&events);
        spent += t.elapsed();
    }
    spent
}

fn stitch(c: &mut Criterion) {
    let sizes: Vec<u64> = std::env::var("STITCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000_000, 10_000_000]);
    let rules = Rules::new(&GuardrailConfig::default());
    let stitcher = Stitcher::new(rules);
    let mut g = c.benchmark_group("stitch");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(BATCH as u64));
    for identifiers in sizes {
        let persons = identifiers / 10;
        let label = format!("{}M_identifiers", identifiers / 1_000_000);

        // The service's block cache (`state.block_cache_mb`), so that reads miss it as they do there.
        let temp =
            TempStore::with_block_cache(StateConfig::default().block_cache_mb).expect("temp store");
        let rss_before = rss_mib();
        let t = Instant::now();
        preload(persons, |evs| apply_batch(&temp.store, &stitcher, evs));
        eprintln!(
            "stitch/{label}: preloaded {persons} persons ({identifiers} identifiers) in {:.1?}; \
             RSS {:.0} MiB (+{:.0}), state on disk {:.0} MiB",
            t.elapsed(),
            rss_mib(),
            rss_mib() - rss_before,
            dir_size_mib(temp.path()),
        );
        // What the unmerge evidence costs: links (one per pair seen together, both directions) and parts.
        let sizes: Vec<String> = temp
            .store
            .approximate_sizes()
            .into_iter()
            .map(|(cf, bytes)| {
                format!(
                    "{cf} {:.0} MiB ({:.0} B/identifier)",
                    bytes as f64 / 1048576.0,
                    bytes as f64 / identifiers as f64
                )
            })
            .collect();
        eprintln!(
            "stitch/{label}: live data per column family: {}",
            sizes.join(", ")
        );
        let memory: Vec<String> = temp
            .store
            .memory_usage()
            .into_iter()
            .map(|(part, bytes)| format!("{part} {:.0} MiB", bytes as f64 / 1048576.0))
            .collect();
        eprintln!("stitch/{label}: RocksDB memory: {}", memory.join(", "));
        let mut stream = Stream::new(persons);
        g.bench_function(format!("rocksdb/{label}"), |b| {
            b.iter_custom(|iters| {
                time_batches(iters, &mut stream, |evs| {
                    apply_batch(&temp.store, &stitcher, evs)
                })
            })
        });
        eprintln!(
            "stitch/{label}: after the measured stream: RSS {:.0} MiB",
            rss_mib()
        );
        drop(temp);

        if std::env::var_os("STITCH_IN_MEMORY").is_some() {
            let mut kv = MemKv::default();
            let t = Instant::now();
            preload(persons, |evs| apply_events(&mut kv, &stitcher, evs));
            eprintln!(
                "stitch/{label}: in memory: preloaded in {:.1?}, {} records, RSS {:.0} MiB",
                t.elapsed(),
                kv.records.len(),
                rss_mib()
            );
            let mut stream = Stream::new(persons);
            g.bench_function(format!("in_memory/{label}"), |b| {
                b.iter_custom(|iters| {
                    time_batches(iters, &mut stream, |evs| {
                        apply_events(&mut kv, &stitcher, evs)
                    })
                })
            });
        }

        let mut uf = UnionFind::default();
        for p in 0..persons {
            uf.apply(&event(p, person_identifiers(p)));
        }
        let mut stream = Stream::new(persons);
        g.bench_function(format!("union_find/{label}"), |b| {
            b.iter_custom(|iters| {
                time_batches(iters, &mut stream, |evs| {
                    evs.iter().for_each(|ev| uf.apply(ev))
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, normalisation, avro, enrichment, stitch);
criterion_main!(benches);
