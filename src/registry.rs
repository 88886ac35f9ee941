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
    /// A 404 without the error code a registry's API gives for what was asked: not that API that
    /// answered.
    #[error(
        "{url} answered 404 without the error code of a schema registry's answer ({body}): does \
         registry.url lead to the Confluent-compatible API? For Apicurio it ends in /apis/ccompat/v7"
    )]
    NotTheApi { url: String, body: String },
    #[error("schema {what} from the registry is not valid Avro: {reason}")]
    BadSchema { what: String, reason: String },
    #[error("registry.ca_file {path}: {reason}")]
    Tls { path: String, reason: String },
    #[error(
        "the output schema is incompatible with the latest version under subject {subject} \
         (compatibility level of the registry): {reason}; evolve schemas/profile_update.avsc compatibly or \
         change the subject's compatibility level"
    )]
    Incompatible { subject: String, reason: String },
}

impl RegistryError {
    /// A 404 whose error code (`{"error_code": 40403, ...}`) is not one of `codes`, the answers of a
    /// Confluent-compatible registry's API to the request made, becomes [`RegistryError::NotTheApi`]:
    /// a wrong path in `registry.url` or a proxy answered (Apicurio says `"error_code": 404` for a path
    /// it does not serve), and taking it for "not found" would dead-letter every message as of an
    /// unknown id.
    fn not_found_unless(self, codes: &[u64]) -> Self {
        match self {
            RegistryError::Refused {
                url,
                status: 404,
                body,
            } if !serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|answer| {
                answer["error_code"]
                    .as_u64()
                    .is_some_and(|code| codes.contains(&code))
            }) =>
            {
                RegistryError::NotTheApi { url, body }
            }
            other => other,
        }
    }

    /// Worth asking again: the registry could not be asked, or answered that it cannot answer now (a
    /// server error, 408, 429).
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. } => true,
            RegistryError::Refused { status, .. } => *status >= 500 || matches!(status, 408 | 429),
            _ => false,
        }
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
    /// Fails only on a `registry.ca_file` that cannot be read.
    pub fn new(cfg: &RegistryConfig) -> Result<Self, RegistryError> {
        let mut agent = ureq::AgentBuilder::new().timeout(cfg.timeout);
        if let Some(path) = &cfg.ca_file {
            agent = agent.tls_config(tls_trusting(path)?);
        }
        let agent = agent.build();
        let authorization = (!cfg.username.is_empty()).then(|| {
            use base64::Engine;
            let pair = format!("{}:{}", cfg.username, cfg.password);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        Ok(Self {
            agent,
            base: cfg.url.trim_end_matches('/').to_string(),
            authorization,
            patience: cfg.patience,
            writers: Mutex::new(HashMap::new()),
        })
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
        // 40403: no schema of that id.
        let found: SchemaById =
            Self::answer(url, req.call()).map_err(|e| e.not_found_unless(&[40403]))?;
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

    /// The writer schema of a message's id, as a decode error when there is none. Only an id the registry
    /// does not have ([`DecodeError::UnknownSchemaId`]) or a schema that is not Avro is the message's
    /// fault, to be dead-lettered. A registry that cannot answer now (unreachable, a server error) is
    /// asked again for up to `registry.patience`, then [`DecodeError::RegistryUnavailable`], as at once
    /// for any other refusal (credentials refused, say): the batch fails rather than dead-letter messages
    /// for the registry's trouble.
    pub fn writer_of_message(&self, id: u32) -> Result<Arc<AvroCodec>, DecodeError> {
        let patience = self.patience;
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.writer(id) {
                Ok(w) => return Ok(w),
                Err(e) if e.is_transient() && started.elapsed() + backoff < patience => {
                    tracing::warn!(error = %e, id, "schema registry cannot answer; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(RegistryError::Refused { status: 404, .. }) => {
                    return Err(DecodeError::UnknownSchemaId(id))
                }
                Err(e @ RegistryError::BadSchema { .. }) => {
                    return Err(DecodeError::Avro(e.to_string()))
                }
                Err(e) => return Err(DecodeError::RegistryUnavailable(e.to_string())),
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
        // 40401, 40402: no such subject or version.
        match Self::answer::<Compatibility>(url, req.send_json(&body))
            .map_err(|e| e.not_found_unless(&[40401, 40402]))
        {
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

/// TLS that trusts the public roots and the certificates in `path` (PEM): a registry behind a private CA.
fn tls_trusting(path: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, RegistryError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let bad = |reason: String| RegistryError::Tls {
        path: path.display().to_string(),
        reason,
    };
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let mut added = 0;
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
        added += 1;
    }
    if added == 0 {
        return Err(bad("no PEM certificate in the file".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
    .map_err(|e| bad(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A loopback registry that answers its connections in turn with `answers` (status, body), one each,
    /// and hands back the requests.
    fn answering(answers: Vec<(u16, &'static str)>) -> (u16, std::thread::JoinHandle<Vec<String>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let mut requests = Vec::new();
            for (status, body) in answers {
                let (mut conn, _) = listener.accept().unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = conn.read(&mut buf).unwrap();
                    request.extend_from_slice(&buf[..n]);
                }
                write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nConnection: close\r\n\
                     Content-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
                requests.push(String::from_utf8(request).unwrap());
            }
            requests
        });
        (port, server)
    }

    /// What the client sends on the wire for basic auth (Apicurio, the registry in the integration tests,
    /// authenticates only through OIDC): one request read from a loopback socket.
    #[test]
    fn basic_auth_goes_in_every_request() {
        let (port, server) = answering(vec![(200, r#"{"schema": "\"string\""}"#)]);
        let registry = Registry::new(&RegistryConfig {
            url: format!("http://127.0.0.1:{port}/apis/ccompat/v7/"),
            username: "alice".into(),
            password: "s3cret".into(),
            ..Default::default()
        })
        .unwrap();
        let codec = registry.writer(42).unwrap();
        assert_eq!(codec.schema(), &apache_avro::Schema::String);
        let request = server.join().unwrap().remove(0);
        assert!(
            request.starts_with("GET /apis/ccompat/v7/schemas/ids/42 HTTP/1.1\r\n"),
            "{request}"
        );
        // base64("alice:s3cret")
        assert!(
            request
                .to_ascii_lowercase()
                .contains("authorization: basic ywxpy2u6cznjcmv0\r\n"),
            "{request}"
        );
        // Cached: no second request (the server is gone).
        assert!(registry.writer(42).is_ok());
    }

    /// Only an unknown id is the message's fault: a registry that cannot answer now is asked again, and
    /// one that refuses the credentials fails the batch at once. Neither dead-letters the message.
    #[test]
    fn only_an_unknown_id_is_the_messages_fault() {
        const SCHEMA: &str = r#"{"schema": "\"string\""}"#;
        const UNKNOWN: &str = r#"{"error_code": 40403, "message": "Schema 7 not found"}"#;
        let registry = |port: u16| {
            Registry::new(&RegistryConfig {
                url: format!("http://127.0.0.1:{port}"),
                patience: Duration::from_secs(5),
                ..Default::default()
            })
            .unwrap()
        };
        let (port, server) = answering(vec![(503, "{}"), (500, "{}"), (200, SCHEMA)]);
        assert!(registry(port).writer_of_message(7).is_ok());
        assert_eq!(server.join().unwrap().len(), 3);

        let (port, server) = answering(vec![(401, r#"{"message": "Unauthorized"}"#)]);
        match registry(port).writer_of_message(7) {
            Err(DecodeError::RegistryUnavailable(e)) => assert!(e.contains("401"), "{e}"),
            Err(other) => panic!("credentials refused: {other}"),
            Ok(_) => panic!("credentials refused, and a schema"),
        }
        assert_eq!(server.join().unwrap().len(), 1, "asked once");

        let (port, server) = answering(vec![(404, UNKNOWN)]);
        assert!(matches!(
            registry(port).writer_of_message(7),
            Err(DecodeError::UnknownSchemaId(7))
        ));
        server.join().unwrap();

        // A 404 from what is not the registry's API (registry.url without /apis/ccompat/v7, as Apicurio
        // answers it): every message would be dead-lettered as of an unknown id.
        let (port, server) = answering(vec![(
            404,
            r#"{"error_code": 404, "message": "RESTEASY003210: Could not find resource"}"#,
        )]);
        match registry(port).writer_of_message(7) {
            Err(DecodeError::RegistryUnavailable(e)) => {
                assert!(e.contains("does registry.url lead to the Confluent"), "{e}")
            }
            Err(other) => panic!("a 404 without the error code: {other}"),
            Ok(_) => panic!("a 404, and a schema"),
        }
        server.join().unwrap();
    }

    #[test]
    fn a_ca_file_without_certificates_is_a_clear_error() {
        let path = std::env::temp_dir().join(format!("empty-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = Registry::new(&RegistryConfig {
            url: "https://registry.example:8081".into(),
            ca_file: Some(path.clone()),
            ..Default::default()
        })
        .err()
        .expect("refused");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        std::fs::remove_file(path).ok();
    }
}
