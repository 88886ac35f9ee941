//! Stitching quality against a ground truth: pairwise precision, recall and F1 over identifiers, over- and
//! under-merged persons, the largest profile.
//!
//! Pairwise: two identifiers form a *true pair* when the truth puts them in the same person, a *predicted
//! pair* when the output puts them in the same profile. Precision = correct predicted pairs / predicted
//! pairs; recall = correct predicted pairs / true pairs. Counted from the contingency table (person ×
//! profile), so it is linear in the number of identifiers, not quadratic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde::Serialize;

use crate::codec::{AvroCodec, ProfileUpdate};
use crate::journeys::PersonTruth;
use crate::kafka::reader::read_committed_with;
use crate::store::{Store, StoreError};

/// (type, normalised value).
pub type Key = (String, String);

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QualityReport {
    pub persons: usize,
    pub profiles: usize,
    pub identifiers: usize,
    /// Identifiers of the truth that no profile holds.
    pub identifiers_missing: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Persons whose profile also holds identifiers of another person.
    pub over_merged_persons: usize,
    /// Persons whose identifiers are spread over more than one profile.
    pub under_merged_persons: usize,
    /// Identifiers in the largest profile.
    pub largest_profile: usize,
}

fn pairs(n: u64) -> u64 {
    n * n.saturating_sub(1) / 2
}

/// Compares `mapping` (identifier → profile id) with the truth.
pub fn evaluate(truth: &[PersonTruth], mapping: &HashMap<Key, String>) -> QualityReport {
    // Identifiers absent from the output count as profiles of their own.
    let mut cell: HashMap<(usize, String), u64> = HashMap::new();
    let mut person_profiles: Vec<BTreeSet<String>> = vec![BTreeSet::new(); truth.len()];
    let mut missing = 0;
    let mut identifiers = 0;
    for (person, t) in truth.iter().enumerate() {
        for id in &t.identifiers {
            identifiers += 1;
            let profile = match mapping.get(id) {
                Some(p) => p.clone(),
                None => {
                    missing += 1;
                    format!("missing:{}:{}", id.0, id.1)
                }
            };
            person_profiles[person].insert(profile.clone());
            *cell.entry((person, profile)).or_insert(0) += 1;
        }
    }
    let mut profile_size: HashMap<&str, u64> = HashMap::new();
    let mut profile_persons: HashMap<&str, usize> = HashMap::new();
    for ((_, profile), n) in &cell {
        *profile_size.entry(profile.as_str()).or_insert(0) += n;
        *profile_persons.entry(profile.as_str()).or_insert(0) += 1;
    }
    let true_pairs: u64 = truth
        .iter()
        .map(|t| pairs(t.identifiers.len() as u64))
        .sum();
    let predicted_pairs: u64 = profile_size.values().map(|&n| pairs(n)).sum();
    let correct: u64 = cell.values().map(|&n| pairs(n)).sum();
    let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    let precision = ratio(correct, predicted_pairs);
    let recall = ratio(correct, true_pairs);
    let f1 = if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    };
    let over_merged_persons = person_profiles
        .iter()
        .filter(|ps| ps.iter().any(|p| profile_persons[p.as_str()] > 1))
        .count();
    let under_merged_persons = person_profiles.iter().filter(|ps| ps.len() > 1).count();
    let mut all_sizes: BTreeMap<&String, usize> = BTreeMap::new();
    for p in mapping.values() {
        *all_sizes.entry(p).or_insert(0) += 1;
    }
    QualityReport {
        persons: truth.len(),
        profiles: all_sizes.len(),
        identifiers,
        identifiers_missing: missing,
        precision,
        recall,
        f1,
        over_merged_persons,
        under_merged_persons,
        largest_profile: all_sizes.values().copied().max().unwrap_or(0),
    }
}

/// identifier → profile id from a state directory.
pub fn mapping_from_state(store: &Store) -> Result<HashMap<Key, String>, StoreError> {
    let mut map = HashMap::new();
    let held = crate::scaleout::lookup::held_locally(store)?;
    crate::scaleout::state::for_each_profile(store, &held.held(), |_, _, p| {
        let id = p.id().to_string();
        for ident in p.identifiers.keys() {
            map.insert((ident.kind.clone(), ident.value.clone()), id.clone());
        }
    })?;
    Ok(map)
}

/// identifier → profile id from the compacted, read_committed view of a profile topic.
pub fn mapping_from_topic(
    base: rdkafka::ClientConfig,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<HashMap<Key, String>> {
    let codec = AvroCodec::profile_update()?;
    let mut latest: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
    for r in read_committed_with(base, topic, timeout)? {
        if let Some(key) = r.key {
            latest.insert(key, r.payload);
        }
    }
    let mut map = HashMap::new();
    for payload in latest.into_values().flatten() {
        let (_, u) = codec.decode_confluent::<ProfileUpdate>(&payload)?;
        if let Some(p) = u.profile {
            for i in p.identifiers {
                map.insert((i.kind, i.value), u.profile_id.clone());
            }
        }
    }
    Ok(map)
}

impl std::fmt::Display for QualityReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} persons, {} profiles, {} identifiers ({} missing from the output)",
            self.persons, self.profiles, self.identifiers, self.identifiers_missing
        )?;
        writeln!(
            f,
            "pairwise precision {:.4}, recall {:.4}, F1 {:.4}",
            self.precision, self.recall, self.f1
        )?;
        write!(
            f,
            "over-merged persons {}, under-merged persons {}, largest profile {} identifiers",
            self.over_merged_persons, self.under_merged_persons, self.largest_profile
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person(ids: &[&str]) -> PersonTruth {
        PersonTruth {
            person: 0,
            identifiers: ids
                .iter()
                .map(|v| ("email".to_string(), v.to_string()))
                .collect(),
            events: 1,
            purchases: BTreeMap::new(),
            channels: BTreeMap::new(),
            story: Default::default(),
        }
    }

    fn mapping(groups: &[(&str, &[&str])]) -> HashMap<Key, String> {
        groups
            .iter()
            .flat_map(|(p, ids)| {
                ids.iter()
                    .map(move |v| (("email".to_string(), v.to_string()), p.to_string()))
            })
            .collect()
    }

    #[test]
    fn perfect_stitching_scores_one() {
        let truth = vec![person(&["a", "b", "c"]), person(&["d", "e"])];
        let r = evaluate(
            &truth,
            &mapping(&[("p1", &["a", "b", "c"]), ("p2", &["d", "e"])]),
        );
        assert_eq!((r.precision, r.recall, r.f1), (1.0, 1.0, 1.0));
        assert_eq!((r.over_merged_persons, r.under_merged_persons), (0, 0));
        assert_eq!(r.largest_profile, 3);
    }

    #[test]
    fn over_and_under_merges_are_counted() {
        let truth = vec![
            person(&["a", "b"]),
            person(&["c", "d"]),
            person(&["e", "f", "g"]),
        ];
        // a,b,c,d glued together (over-merge of two persons); g split off (under-merge).
        let r = evaluate(
            &truth,
            &mapping(&[
                ("p1", &["a", "b", "c", "d"]),
                ("p2", &["e", "f"]),
                ("p3", &["g"]),
            ]),
        );
        // True pairs: 1 + 1 + 3 = 5. Predicted pairs: 6 + 1 = 7. Correct: 1 + 1 + 1 = 3.
        assert!((r.precision - 3.0 / 7.0).abs() < 1e-12);
        assert!((r.recall - 3.0 / 5.0).abs() < 1e-12);
        assert_eq!(r.over_merged_persons, 2);
        assert_eq!(r.under_merged_persons, 1);
        assert_eq!(r.largest_profile, 4);
    }

    #[test]
    fn missing_identifiers_hurt_recall() {
        let truth = vec![person(&["a", "b"])];
        let r = evaluate(&truth, &mapping(&[("p1", &["a"])]));
        assert_eq!(r.identifiers_missing, 1);
        assert_eq!(r.recall, 0.0);
        assert_eq!(r.under_merged_persons, 1);
    }
}
