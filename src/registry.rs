//! A client of a Confluent-compatible Schema Registry (the Confluent REST API, which Confluent Schema
//! Registry, Apicurio Registry's `ccompat` API, Karapace and Redpanda serve): writer schemas fetched by the
//! id in each Avro message, once per id, and the output schema registered under `<output topic>-value`
//! after a compatibility check. README "Schema Registry".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;

use crate::codec::{AvroCodec, DecodeError};
use crate::config::RegistryConfig;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry could not be asked (connection refused, timeout, TLS): worth retrying.
    #[error("schema registry {url} unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    /// The registry answered, with an error.
    #[error("schema registry {url} answered {status}: {body}")]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
    #[error("schema {what} from the registry is not valid Avro: {reason}")]
    BadSchema { what: String, reason: String },
    #[error(
        "the output schema is incompatible with the latest version under subject {subject} \
         (compatibility level of the registry): {reason}; evolve schemas/profile_update.avsc compatibly or \
         change the subject's compatibility level"
    )]
    Incompatible { subject: String, reason: String },
}

impl RegistryError {
    pub fn is_unreachable(&self) -> bool {
        matches!(self, RegistryError::Unreachable { .. })
    }
}

/// The registry, with the writer schemas fetched so far.
pub struct Registry {
    agent: ureq::Agent,
    base: String,
    authorization: Option<String>,
    patience: Duration,
    writers: Mutex<HashMap<u32, Arc<AvroCodec>>>,
}

#[derive(Deserialize)]
struct SchemaById {
    schema: String,
    #[serde(rename = "schemaType", default)]
    schema_type: Option<String>,
}

#[derive(Deserialize)]
struct Registered {
    id: u32,
}

#[derive(Deserialize)]
struct Compatibility {
    is_compatible: bool,
    #[serde(default)]
    messages: Vec<String>,
}

impl Registry {
    pub fn new(cfg: &RegistryConfig) -> Self {
        let agent = ureq::AgentBuilder::new().timeout(cfg.timeout).build();
        let authorization = (!cfg.username.is_empty()).then(|| {
            use base64::Engine;
            let pair = format!("{}:{}", cfg.username, cfg.password);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        Self {
            agent,
            base: cfg.url.trim_end_matches('/').to_string(),
            authorization,
            patience: cfg.patience,
            writers: Mutex::new(HashMap::new()),
        }
    }

    fn request(&self, method: &str, path: &str) -> (String, ureq::Request) {
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.request(method, &url).set(
            "Accept",
            "application/vnd.schemaregistry.v1+json, application/json",
        );
        if let Some(auth) = &self.authorization {
            req = req.set("Authorization", auth);
        }
        (url, req)
    }

    fn answer<T: serde::de::DeserializeOwned>(
        url: String,
        result: Result<ureq::Response, ureq::Error>,
    ) -> Result<T, RegistryError> {
        match result {
            Ok(resp) => resp.into_json().map_err(|e| RegistryError::Refused {
                url,
                status: 200,
                body: format!("unreadable answer: {e}"),
            }),
            Err(ureq::Error::Status(status, resp)) => Err(RegistryError::Refused {
                url,
                status,
                body: resp.into_string().unwrap_or_default(),
            }),
            Err(e) => Err(RegistryError::Unreachable {
                url,
                reason: e.to_string(),
            }),
        }
    }

    /// The writer schema of `id`: from the cache, or fetched once and kept (ids never change meaning).
    pub fn writer(&self, id: u32) -> Result<Arc<AvroCodec>, RegistryError> {
        if let Some(codec) = self.writers.lock().ok().and_then(|w| w.get(&id).cloned()) {
            return Ok(codec);
        }
        let (url, req) = self.request("GET", &format!("/schemas/ids/{id}"));
        let found: SchemaById = Self::answer(url, req.call())?;
        let bad = |reason: String| RegistryError::BadSchema {
            what: format!("id {id}"),
            reason,
        };
        if let Some(t) = found.schema_type.filter(|t| t != "AVRO") {
            return Err(bad(format!("a {t} schema, not Avro")));
        }
        let schema =
            apache_avro::Schema::parse_str(&found.schema).map_err(|e| bad(e.to_string()))?;
        let codec = Arc::new(AvroCodec::new(schema).map_err(|e| bad(e.to_string()))?);
        if let Ok(mut w) = self.writers.lock() {
            w.insert(id, codec.clone());
        }
        Ok(codec)
    }

    /// Decodes a Confluent-framed Avro message with the writer schema its id names. A registry that
    /// cannot be reached is asked again for up to `registry.patience`; an id the registry does not have
    /// is a bad message.
    pub fn decode_value(&self, payload: &[u8]) -> Result<apache_avro::types::Value, DecodeError> {
        let (id, body) = crate::codec::avro::split_confluent(payload)?;
        self.writer_of_message(id)?.decode_value(body)
    }

    /// The writer schema of a message's id, as a decode error when there is none: asked again for up to
    /// `registry.patience` while the registry is unreachable, then [`DecodeError::RegistryUnavailable`];
    /// an id the registry does not have is [`DecodeError::UnknownSchemaId`].
    pub fn writer_of_message(&self, id: u32) -> Result<Arc<AvroCodec>, DecodeError> {
        let patience = self.patience;
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.writer(id) {
                Ok(w) => return Ok(w),
                Err(e) if e.is_unreachable() && started.elapsed() + backoff < patience => {
                    tracing::warn!(error = %e, id, "schema registry unreachable; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) if e.is_unreachable() => {
                    return Err(DecodeError::RegistryUnavailable(e.to_string()))
                }
                Err(RegistryError::Refused { status: 404, .. }) => {
                    return Err(DecodeError::UnknownSchemaId(id))
                }
                Err(e) => return Err(DecodeError::Avro(e.to_string())),
            }
        }
    }

    /// Registers `schema` under `subject` after checking it against the subject's latest version, and
    /// returns the id the registry gives it (the same id for a schema registered before).
    pub fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let body = json!({ "schema": schema, "schemaType": "AVRO" });
        let (url, req) = self.request(
            "POST",
            &format!("/compatibility/subjects/{subject}/versions/latest"),
        );
        match Self::answer::<Compatibility>(url, req.send_json(&body)) {
            Ok(c) if !c.is_compatible => {
                return Err(RegistryError::Incompatible {
                    subject: subject.into(),
                    reason: if c.messages.is_empty() {
                        "no reason given".into()
                    } else {
                        c.messages.join("; ")
                    },
                })
            }
            Ok(_) => {}
            // No version under the subject yet: nothing to be compatible with.
            Err(RegistryError::Refused { status: 404, .. }) => {}
            Err(e) => return Err(e),
        }
        let (url, req) = self.request("POST", &format!("/subjects/{subject}/versions"));
        match Self::answer::<Registered>(url, req.send_json(&body)) {
            Ok(r) => Ok(r.id),
            // Some registries check compatibility only here.
            Err(RegistryError::Refused {
                status: 409, body, ..
            }) => Err(RegistryError::Incompatible {
                subject: subject.into(),
                reason: body,
            }),
            Err(e) => Err(e),
        }
    }
}
