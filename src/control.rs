//! Commands on the control topic: erasure (right to be forgotten) and unlinking. They are read in the
//! same transactions as the channel topics, so a command is applied exactly once, and its tombstones and
//! split profiles are produced atomically with the state change.
//!
//! One JSON object per message:
//!
//! ```json
//! {"op": "erase_identifier", "type": "email", "value": "Alice@Example.com"}
//! {"op": "erase_identifier", "type": "email", "hash": "<64 hex digits: the identifier as hashed on the output>"}
//! {"op": "erase_identifier", "type": "email", "value": "alice@example.com", "suppress": true}
//! {"op": "unsuppress", "type": "email", "value": "alice@example.com"}
//! {"op": "release"}
//! {"op": "erase_profile", "profile_id": "p-3f2a..."}
//! {"op": "unlink", "a": {"type": "email", "value": "a@x.io"}, "b": {"type": "device_id", "value": "tablet-1"}}
//! ```
//!
//! Identifiers are normalised like event identifiers. Erasing an identifier also erases its
//! channel-scoped copies (kept for people who refused cross-channel identification).

use serde::{Deserialize, Serialize};

use crate::config::Config;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawId {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Remove one identifier everywhere; its profile is recomputed and split if it held it together.
    /// Given by its clear `value`, or for a hashed type by its `hash` (so that the clear value never
    /// travels on the control topic).
    EraseIdentifier {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hash: Option<String>,
        /// Also keep a salted hash of it, so that later events carrying it are stripped of it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        suppress: bool,
    },
    /// Lift a suppression: later events carrying the identifier link it again.
    Unsuppress {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hash: Option<String>,
    },
    /// Close the merge-storm breaker on every instance (`stitcher release`).
    Release {},
    /// Remove a whole profile (any of its ids, current or merged away) with all its identifiers.
    EraseProfile { profile_id: String },
    /// Remove the link between two identifiers of one profile; split it if nothing else holds it.
    Unlink { a: RawId, b: RawId },
}

impl Command {
    pub fn op(&self) -> &'static str {
        match self {
            Command::EraseIdentifier { .. } => "erase_identifier",
            Command::Unsuppress { .. } => "unsuppress",
            Command::Release {} => "release",
            Command::EraseProfile { .. } => "erase_profile",
            Command::Unlink { .. } => "unlink",
        }
    }

    pub fn parse(payload: &[u8]) -> Result<Self, String> {
        let command: Command =
            serde_json::from_slice(payload).map_err(|e| format!("invalid control command: {e}"))?;
        if let Command::EraseIdentifier { value, hash, .. }
        | Command::Unsuppress { value, hash, .. } = &command
        {
            if value.is_some() == hash.is_some() {
                return Err(format!(
                    "invalid control command: {} takes either value or hash",
                    command.op()
                ));
            }
        }
        Ok(command)
    }
}

/// Produces one command to `control.topic` and waits until the broker has it: its (partition, offset).
pub async fn send(cfg: &Config, command: &Command) -> anyhow::Result<(i32, i64)> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    anyhow::ensure!(
        !cfg.control.topic.is_empty(),
        "control.topic is empty: this deployment has no control topic"
    );
    crate::kafka::ensure_reachable(cfg).await?;
    let producer: FutureProducer = crate::kafka::base_config(cfg)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", SEND_TIMEOUT.as_millis().to_string())
        .create()?;
    let payload = serde_json::to_vec(command)?;
    producer
        .send(
            FutureRecord::<[u8], _>::to(&cfg.control.topic).payload(&payload),
            SEND_TIMEOUT,
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("cannot send to {}: {e}", cfg.control.topic))
}

/// How long a command waits to be written to the control topic.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_bad_ones_are_explained() {
        let c = Command::parse(br#"{"op":"erase_identifier","type":"email","value":"A@x.io"}"#)
            .unwrap();
        assert_eq!(
            c,
            Command::EraseIdentifier {
                kind: "email".into(),
                value: Some("A@x.io".into()),
                hash: None,
                suppress: false,
            }
        );
        let hashed = Command::EraseIdentifier {
            kind: "email".into(),
            value: None,
            hash: Some("ab".repeat(32)),
            suppress: true,
        };
        let json = serde_json::to_string(&hashed).unwrap();
        assert!(!json.contains("value"), "{json}");
        assert!(json.contains(r#""suppress":true"#), "{json}");
        let c = Command::parse(br#"{"op":"unsuppress","type":"email","value":"a@x.io"}"#).unwrap();
        assert_eq!(c.op(), "unsuppress");
        assert!(Command::parse(br#"{"op":"unsuppress","type":"email"}"#).is_err());
        assert_eq!(Command::parse(json.as_bytes()).unwrap(), hashed);
        assert!(Command::parse(br#"{"op":"erase_identifier","type":"email"}"#).is_err());
        let c = Command::parse(
            br#"{"op":"unlink","a":{"type":"email","value":"a@x.io"},"b":{"type":"device_id","value":"t"}}"#,
        )
        .unwrap();
        assert_eq!(c.op(), "unlink");
        let json = serde_json::to_string(&Command::EraseProfile {
            profile_id: "p-1".into(),
        })
        .unwrap();
        assert_eq!(json, r#"{"op":"erase_profile","profile_id":"p-1"}"#);
        let err = Command::parse(br#"{"op":"forget_everything"}"#).unwrap_err();
        assert!(err.starts_with("invalid control command"), "{err}");
    }
}
