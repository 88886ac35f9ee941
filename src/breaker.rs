//! The merge-storm breaker (README "Merge storms"): merges are counted per identifier type and per input
//! topic in event-time minutes; when one minute's count for a key goes past `breaker.multiple` times that
//! key's per-minute rate over the `breaker.baseline_minutes` before it (and past `breaker.min_merges`), the
//! key trips. While it is tripped, events
//! carrying an identifier of that type (or read from that topic) are not stitched: they go, as read, to the
//! quarantine topic, until `stitcher release` closes the breaker (and, with `--replay`, produces them to
//! their input topics again).
//!
//! Event time, not the clock: a replay of a backlog sees the rates the events had when they happened, so it
//! does not trip where the live run did not. The breaker is per instance and in memory: each instance counts
//! the merges it applies, and a restart closes it (it trips again if the storm goes on).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::model::{Event, Millis};

const MINUTE: Millis = 60_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Trip when a minute's merges for one key exceed this multiple of its recent per-minute rate; 0: off.
    pub multiple: f64,
    /// ...and exceed this many merges in the minute.
    pub min_merges: u64,
    /// How many minutes before a minute its recent rate averages over.
    pub baseline_minutes: u32,
    /// Where held events go, as read, with headers naming their source and the tripped key.
    pub quarantine_topic: String,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            multiple: 0.0,
            min_merges: 200,
            baseline_minutes: 60,
            quarantine_topic: "stitcher-quarantine".into(),
        }
    }
}

impl BreakerConfig {
    pub fn enabled(&self) -> bool {
        self.multiple > 0.0
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.multiple.is_finite() && self.multiple >= 0.0) {
            return Err("breaker.multiple must be 0 (off) or a positive number".into());
        }
        if self.enabled() && (self.min_merges == 0 || self.baseline_minutes == 0) {
            return Err(
                "breaker.min_merges and breaker.baseline_minutes must be at least 1".into(),
            );
        }
        if self.enabled() && self.quarantine_topic.is_empty() {
            return Err("breaker.quarantine_topic is required when the breaker is on".into());
        }
        Ok(())
    }
}

/// One key's merges per event-time minute, for the newest minutes seen (late events count in their own
/// minute).
#[derive(Debug, Default, Clone)]
struct Rate {
    minutes: BTreeMap<Millis, u64>,
}

/// Why a key tripped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trip {
    /// Event-time minute (ms) in which it tripped.
    pub minute: Millis,
    pub merges: u64,
    pub baseline: f64,
}

#[derive(Debug, Default)]
struct State {
    rates: HashMap<String, Rate>,
    tripped: BTreeMap<String, Trip>,
}

#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: Mutex<State>,
}

/// The key of an identifier type, and of an input topic.
pub fn type_key(kind: &str) -> String {
    format!("type:{kind}")
}

pub fn topic_key(topic: &str) -> String {
    format!("topic:{topic}")
}

impl Breaker {
    pub fn new(cfg: &BreakerConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding it leaves counters only: they are fine to keep using.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts `merges` merges for `key` at event time `at`; the trip it caused, if it tripped now.
    pub fn observe(&self, key: &str, at: Millis, merges: u64) -> Option<Trip> {
        if !self.cfg.enabled() || merges == 0 {
            return None;
        }
        let minute = at.div_euclid(MINUTE) * MINUTE;
        let window = i64::from(self.cfg.baseline_minutes);
        let mut guard = self.state();
        let state = &mut *guard;
        let rate = state.rates.entry(key.to_string()).or_default();
        let count = {
            let c = rate.minutes.entry(minute).or_insert(0);
            *c += merges;
            *c
        };
        // The recent rate: merges per minute over the `baseline_minutes` before this one (empty ones count).
        let before: u64 = rate
            .minutes
            .range(minute - window * MINUTE..minute)
            .map(|(_, c)| c)
            .sum();
        let baseline = before as f64 / window as f64;
        // Bounded: the newest minutes seen, enough for the window of any minute near the newest.
        while rate.minutes.len() > 2 * self.cfg.baseline_minutes as usize + 16 {
            rate.minutes.pop_first();
        }
        let limit = (self.cfg.multiple * baseline).max(self.cfg.min_merges as f64);
        if count as f64 <= limit || state.tripped.contains_key(key) {
            return None;
        }
        let trip = Trip {
            minute,
            merges: count,
            baseline,
        };
        state.tripped.insert(key.to_string(), trip.clone());
        Some(trip)
    }

    /// The tripped key that holds this event back (an identifier type it carries, or its input topic).
    pub fn holds(&self, ev: &Event) -> Option<String> {
        if !self.cfg.enabled() {
            return None;
        }
        let state = self.state();
        if state.tripped.is_empty() {
            return None;
        }
        let by_topic = ev.origin.as_ref().map(|o| topic_key(&o.topic));
        by_topic
            .into_iter()
            .chain(ev.identifiers.iter().map(|i| type_key(i.base_kind())))
            .find(|k| state.tripped.contains_key(k))
    }

    /// Closes the breaker: every key untripped, rates kept.
    pub fn release(&self) -> Vec<String> {
        let mut state = self.state();
        std::mem::take(&mut state.tripped).into_keys().collect()
    }

    pub fn tripped(&self) -> Vec<String> {
        self.state().tripped.keys().cloned().collect()
    }

    pub fn quarantine_topic(&self) -> &str {
        &self.cfg.quarantine_topic
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(&BreakerConfig {
            multiple: 5.0,
            min_merges: 50,
            baseline_minutes: 10,
            ..Default::default()
        })
    }

    /// A steady rate never trips; a jump past the multiple trips within the minute, after a bounded number
    /// of merges; release closes it.
    #[test]
    fn trips_on_a_jump_not_on_a_steady_rate() {
        let b = breaker();
        for minute in 0..120 {
            for _ in 0..30 {
                assert_eq!(b.observe("type:email", minute * MINUTE, 1), None);
            }
        }
        let storm = 120 * MINUTE;
        let mut merges = 0;
        let trip = loop {
            merges += 1;
            if let Some(t) = b.observe("type:loyalty_id", storm, 1) {
                break t;
            }
            assert!(merges < 1_000, "never tripped");
        };
        // No history for loyalty_id: the floor decides.
        assert_eq!(merges, 51);
        assert_eq!(trip.merges, 51);
        let mut email = 0;
        while b.observe("type:email", storm, 1).is_none() {
            email += 1;
            assert!(email < 1_000);
        }
        // About five times the steady 30 a minute.
        assert!((140..=160).contains(&email), "{email}");
        assert_eq!(b.tripped(), ["type:email", "type:loyalty_id"]);
        assert_eq!(b.release().len(), 2);
        assert!(b.tripped().is_empty());
    }

    #[test]
    fn off_by_default() {
        let b = Breaker::new(&BreakerConfig::default());
        for _ in 0..10_000 {
            assert_eq!(b.observe("type:email", 0, 1), None);
        }
    }
}
