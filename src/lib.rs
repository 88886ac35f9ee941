//! Identity stitching for omnichannel customer events on Apache Kafka.
//!
//! Channels (web, app, email, store tills, call centre, social) publish events to their own topics. This
//! crate consumes them, normalises the identifiers they carry, stitches identifiers seen together into one
//! graph per person (kept in RocksDB, bounded by guardrails), enriches a profile per person from every
//! channel, and produces profile updates keyed by profile id, exactly once.
//!
//! # Layout
//!
//! - [`cli`], [`config`], [`commands`], [`app`], [`shutdown`]: the binary's surface and wiring.
//! - [`model`]: identifiers, events, profile ids.
//! - [`normalize`]: from what channels send to what stitching sees (email, E.164 phones, junk, hashing).
//! - [`codec`]: Avro in the Confluent wire format, and JSON.
//! - [`stitch`]: the merge logic (pure, property-tested) and the guardrails.
//! - [`profile`]: enrichment; every field an order-independent join.
//! - [`store`]: RocksDB: the local copy of the shards and where each stands in its changelog.
//! - [`processor`]: decoding, normalising, dead letters, control commands, output records.
//! - [`engine`]: one batch's messages to shard state changes and records, without Kafka.
//! - [`kafka`], [`pipeline`]: the consume-process-commit loop with Kafka transactions, shard assignment
//!   and restore; [`ahead`]: input decoded on a thread of its own, ahead of the batch; [`worker`]: the
//!   threads they hand work to.
//! - [`control`]: erase and unlink commands from the control topic.
//! - [`inspect`]: a profile with its links and their evidence (`stitcher inspect`, `/explain`).
//! - [`metrics`], [`http`]: Prometheus metrics, probes, profile lookup.
//! - [`journeys`], [`generate`], [`demo`]: synthetic journeys with ground truth, and the demo.
//! - [`quality`], [`bench`]: stitching quality against ground truth; the end-to-end benchmark.
//! - [`backtest`]: candidate rules replayed over the retained input topics, compared with the live profiles.
//! - [`scaleout`]: the graph in shards shared by any number of instances: the owner protocol, its
//!   simulation, the per-shard state with its changelog, lookups from any instance.
//!
//! docs/DESIGN.md describes the state and the commit protocol.

/// `From` conversions into an error enum whose variants wrap a cause and print it in their message
/// (`#[error("kafka: {0}")]`). thiserror's `#[from]` would also make the cause the error's source, and
/// then every report of the chain (`{:#}`, anyhow's) printed the cause twice.
macro_rules! error_from {
    ($error:ty { $($cause:ty => $variant:ident),* $(,)? }) => {
        $(impl From<$cause> for $error {
            fn from(e: $cause) -> Self {
                Self::$variant(e)
            }
        })*
    };
}

/// An environment variable parsed, or `default`: the unit tests' knobs (`PROPTEST_CASES`, `FUZZ_CASES`,
/// `SIM_SEED`).
#[cfg(test)]
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub mod ahead;
pub mod app;
pub mod backtest;
pub mod bench;
pub mod breaker;
pub mod cli;
pub mod codec;
pub mod commands;
pub mod config;
pub mod control;
pub mod demo;
pub mod engine;
#[cfg(test)]
mod fuzz;
pub mod generate;
pub mod http;
pub mod inspect;
pub mod journeys;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod normalize;
pub mod pipeline;
pub mod processor;
pub mod profile;
pub mod quality;
pub mod registry;
pub mod scaleout;
pub mod shutdown;
pub mod stitch;
pub mod store;
pub mod worker;
