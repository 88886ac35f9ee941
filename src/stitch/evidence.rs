//! Why two identifiers are linked: the evidence kept for every pair of identifiers that appeared together
//! in an accepted event. Splitting a profile (erasure, unlink, a shared identifier found) recomputes the
//! connected components of these links, so a link must exist for every pair that was ever seen together:
//! a spanning tree would lose the other paths through the removed identifier.
//!
//! Size: one fixed-size record per distinct linked pair, whatever the number of events; links never cross
//! profiles, so an identifier has at most `guardrails.max_profile_identifiers - 1` of them.

use serde::{Deserialize, Serialize};

use crate::model::{Event, Millis};

/// `S` is the type of its texts: owned, or borrowed from an encoded record (`state::Raw`) where a links
/// record is edited without decoding the links the event does not touch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence<S = String> {
    /// Events that carried both identifiers.
    pub events: u64,
    /// The earliest of them (time, event id) and its channel.
    pub first_at: Millis,
    pub first_event: S,
    pub first_channel: S,
    pub last_at: Millis,
}

impl Evidence {
    pub fn of(ev: &Event) -> Self {
        Self {
            events: 1,
            first_at: ev.timestamp,
            first_event: ev.event_id.clone(),
            first_channel: ev.channel.clone(),
            last_at: ev.timestamp,
        }
    }

    /// The same evidence with its texts borrowed (or converted) by `f`.
    pub fn map<'a, T>(&'a self, f: impl Fn(&'a str) -> T) -> Evidence<T> {
        Evidence {
            events: self.events,
            first_at: self.first_at,
            first_event: f(&self.first_event),
            first_channel: f(&self.first_channel),
            last_at: self.last_at,
        }
    }
}

impl<S: Ord + Clone> Evidence<S> {
    /// Joins two records of the same link. Commutative and associative, so it can run as a RocksDB merge
    /// operator on operands in any grouping.
    pub fn join(&mut self, other: &Evidence<S>) {
        self.events = self.events.saturating_add(other.events);
        if (other.first_at, &other.first_event) < (self.first_at, &self.first_event) {
            self.first_at = other.first_at;
            self.first_event.clone_from(&other.first_event);
            self.first_channel.clone_from(&other.first_channel);
        }
        self.last_at = self.last_at.max(other.last_at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(events: u64, first_at: Millis, id: &str, last_at: Millis) -> Evidence {
        Evidence {
            events,
            first_at,
            first_event: id.into(),
            first_channel: format!("ch-{id}"),
            last_at,
        }
    }

    #[test]
    fn join_is_commutative_and_associative() {
        let (a, b, c) = (e(1, 5, "a", 9), e(2, 3, "b", 4), e(4, 3, "a", 12));
        let fold = |xs: [&Evidence; 3]| {
            let mut acc = xs[0].clone();
            acc.join(xs[1]);
            acc.join(xs[2]);
            acc
        };
        let want = fold([&a, &b, &c]);
        assert_eq!(fold([&c, &b, &a]), want);
        assert_eq!(fold([&b, &a, &c]), want);
        let mut bc = b.clone();
        bc.join(&c);
        let mut a_bc = a.clone();
        a_bc.join(&bc);
        assert_eq!(a_bc, want);
        assert_eq!(want, e(7, 3, "a", 12));
        assert_eq!(want.first_channel, "ch-a");
    }
}
