//! The identity change record (README "Identity change stream"; docs/DESIGN.md): JSON, keyed by profile id,
//! one per profile whose identity changed in a transaction and one per profile id that stopped existing.
//! The last record of every key holds that profile's identifiers, so the identifier-to-profile mapping can
//! be rebuilt from the topic alone ([`Mapping`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::update::RefusedLink;
use crate::model::Millis;
use crate::stitch::Trigger;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityChange {
    pub profile_id: String,
    /// Increases with every identity change of this profile id.
    pub version: u64,
    /// What happened in the transaction: `create`, `link`, `merge`, `rename`, `refused`, `split`,
    /// `shared`, `unlink`, `erase`, `merged_into`.
    pub changes: Vec<String>,
    /// Every identifier of the profile afterwards; empty when the id stopped existing.
    pub identifiers: Vec<IdentityRef>,
    /// The id it now lives in, when it stopped existing by a merge (or a rename, or a split's largest piece).
    #[serde(default)]
    pub merged_into: Option<String>,
    /// Ids that stopped existing by joining this one.
    #[serde(default)]
    pub merged_from: Vec<String>,
    /// The profile it came out of, in a split.
    #[serde(default)]
    pub split_from: Option<String>,
    /// Links the guardrails refused.
    #[serde(default)]
    pub refused: Vec<RefusedLink>,
    pub trigger: TriggerRecord,
    /// When the record was made (ms since the epoch).
    pub at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IdentityRef {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

/// What caused the change: an event (its id, channel and input record) or a control command (its record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerRecord {
    #[serde(default)]
    pub event_id: Option<String>,
    #[serde(default)]
    pub command: Option<String>,
    pub channel: String,
    #[serde(default)]
    pub topic: Option<String>,
    #[serde(default)]
    pub partition: Option<i32>,
    #[serde(default)]
    pub offset: Option<i64>,
}

impl From<&Trigger> for TriggerRecord {
    fn from(t: &Trigger) -> Self {
        let origin = t.origin.as_ref();
        Self {
            event_id: (!t.command).then(|| t.id.clone()),
            command: t.command.then(|| t.id.clone()),
            channel: t.channel.clone(),
            topic: origin.map(|o| o.topic.clone()),
            partition: origin.map(|o| o.partition),
            offset: origin.map(|o| o.offset),
        }
    }
}

impl IdentityChange {
    /// The record of a profile id that stopped existing: `change` says how; `merged_into`, where it lives
    /// on.
    pub fn ended(
        profile_id: String,
        version: u64,
        change: &str,
        merged_into: Option<String>,
        trigger: TriggerRecord,
        at: Millis,
    ) -> Self {
        Self {
            profile_id,
            version,
            changes: vec![change.to_string()],
            identifiers: vec![],
            merged_into,
            merged_from: vec![],
            split_from: None,
            refused: vec![],
            trigger,
            at,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings, numbers and vectors always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// The identifier-to-profile mapping rebuilt from the change stream: the last record of each profile id
/// (by topic order; its version is checked to increase).
#[derive(Debug, Default)]
pub struct Mapping {
    last: BTreeMap<String, IdentityChange>,
}

impl Mapping {
    /// Takes the next record of one key, in the topic's order. A version that does not increase while
    /// the id lives is an error; an id that ended (a record without identifiers) may start again lower.
    pub fn apply(&mut self, change: IdentityChange) -> Result<(), String> {
        if let Some(prev) = self.last.get(&change.profile_id) {
            if !prev.identifiers.is_empty() && change.version <= prev.version {
                return Err(format!(
                    "profile {}: version {} after {}",
                    change.profile_id, change.version, prev.version
                ));
            }
        }
        self.last.insert(change.profile_id.clone(), change);
        Ok(())
    }

    /// Every identifier with the profile id holding it.
    pub fn identifiers(&self) -> BTreeMap<IdentityRef, String> {
        self.last
            .values()
            .flat_map(|c| {
                c.identifiers
                    .iter()
                    .map(|i| (i.clone(), c.profile_id.clone()))
            })
            .collect()
    }

    /// The last record of a profile id.
    pub fn get(&self, profile_id: &str) -> Option<&IdentityChange> {
        self.last.get(profile_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(id: &str, version: u64, ids: &[&str]) -> IdentityChange {
        IdentityChange {
            profile_id: id.into(),
            version,
            changes: vec!["link".into()],
            identifiers: ids
                .iter()
                .map(|v| IdentityRef {
                    kind: "email".into(),
                    value: v.to_string(),
                })
                .collect(),
            merged_into: None,
            merged_from: vec![],
            split_from: None,
            refused: vec![],
            trigger: TriggerRecord::from(&Trigger::command("control:ctl:0:7")),
            at: 1,
        }
    }

    #[test]
    fn command_triggers_name_their_record() {
        let t = TriggerRecord::from(&Trigger::command("control:erase-requests:2:41"));
        assert_eq!(t.command.as_deref(), Some("control:erase-requests:2:41"));
        assert_eq!(t.event_id, None);
        assert_eq!(
            (t.topic.as_deref(), t.partition, t.offset),
            (Some("erase-requests"), Some(2), Some(41))
        );
    }

    #[test]
    fn the_last_record_of_each_id_decides_and_versions_must_increase() {
        let mut m = Mapping::default();
        m.apply(change("a", 1, &["x"])).unwrap();
        m.apply(change("b", 1, &["y"])).unwrap();
        m.apply(change("a", 3, &["x", "y"])).unwrap();
        m.apply(change("b", 2, &[])).unwrap();
        // b ended; made again later, it may start lower.
        m.apply(change("b", 1, &["z"])).unwrap();
        m.apply(change("b", 2, &[])).unwrap();
        let got: Vec<(String, String)> = m
            .identifiers()
            .into_iter()
            .map(|(i, p)| (i.value, p))
            .collect();
        assert_eq!(
            got,
            vec![("x".into(), "a".into()), ("y".into(), "a".into())]
        );
        assert!(m.apply(change("a", 3, &["x"])).is_err());
        let bytes = change("a", 4, &["x"]).encode();
        assert_eq!(
            IdentityChange::decode(&bytes).unwrap(),
            change("a", 4, &["x"])
        );
    }
}
