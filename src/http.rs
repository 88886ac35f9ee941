//! HTTP: Prometheus `/metrics`, `/healthz`, `/readyz`, and the profile lookup used by call-centre screens.
//!
//! - `GET /v1/profiles/{profile_id}`: follows redirects of merged profiles.
//! - `GET /v1/identifiers/{type}/{value}`: the value is normalised (and hashed) exactly as in stitching.
//! - `GET /v1/identifiers/{type}/{value}/explain`, `GET /v1/profiles/{profile_id}/explain`: the profile
//!   with every identifier's links and their evidence, the events each anchors and the ids merged into it
//!   ([`crate::inspect`]).
//!
//! Answers come from local RocksDB state. 404 for unknown ids, 400 for malformed ones. With
//! `http.bearer_token` set, the lookup routes require `Authorization: Bearer <token>`.
//!
//! In scale-out mode only `GET /v1/identifiers/{type}/{value}` answers (the others 501): any instance
//! answers it, climbing the shards it holds and forwarding the rest of the climb to the owner of the next
//! shard (`GET /internal/v1/climb/...`, [`crate::scaleout::routing`]); 503 with `Retry-After` while a shard
//! on the way is being reassigned.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::codec::update::ProfileRecord;
use crate::metrics::Metrics;
use crate::model::Identifier;
use crate::model::{NodeId, ProfileId};
use crate::normalize::Normalizer;
use crate::scaleout::lookup::{lookup, HeldShards, Lookup};
use crate::scaleout::routing::{self, Owners};
use crate::store::Store;

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Metrics,
    pub store: Option<Store>,
    pub normalizer: Arc<Normalizer>,
    pub bearer_token: Option<String>,
    /// In scale-out mode, the shards this instance holds (identifier lookups climb them) and where the
    /// others are (the rest of a climb is forwarded there).
    pub shards: Option<(HeldShards, Owners)>,
}

#[derive(Serialize)]
struct LookupAnswer {
    profile_id: String,
    /// The id asked for, when it was merged into `profile_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    redirected_from: Option<String>,
    profile: ProfileRecord,
}

#[derive(Serialize)]
struct ErrorAnswer {
    error: String,
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ErrorAnswer { error: msg.into() })).into_response()
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/profiles/:id", get(by_profile_id))
        .route("/v1/profiles/:id/explain", get(explain_profile))
        .route("/v1/identifiers/:kind/:value", get(by_identifier))
        .route("/v1/identifiers/:kind/:value/explain", get(explain))
        .route("/internal/v1/climb/:kind/:value", get(climb))
        .with_state(state)
}

/// Serves until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

/// 200 while the instance makes progress, else 503 with the reason ([`crate::metrics::Health`]).
async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    match s.metrics.health.check() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

fn authorized(s: &HttpState, headers: &HeaderMap) -> bool {
    match &s.bearer_token {
        None => true,
        Some(token) => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes())),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a lookup finds in state: nothing, or the answer.
type Found<T> = Result<Option<T>, crate::store::StoreError>;

/// A refused request: its status and message.
type Refused = (StatusCode, String);

/// What every lookup route checks first: the token.
fn authorize(s: &HttpState, headers: &HeaderMap) -> Result<(), Refused> {
    if authorized(s, headers) {
        Ok(())
    } else {
        Err((
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        ))
    }
}

/// Scale-out mode keeps neither an index of profile ids nor the links an explanation shows.
fn sharded_refuses(s: &HttpState) -> Result<(), Refused> {
    match s.shards {
        Some(_) => Err((
            StatusCode::NOT_IMPLEMENTED,
            "scale-out mode answers lookups by identifier only: GET /v1/identifiers/{type}/{value}"
                .into(),
        )),
        None => Ok(()),
    }
}

/// What every lookup route checks last: that there is state to read.
fn state(s: &HttpState) -> Result<Store, Refused> {
    s.store
        .clone()
        .ok_or_else(|| (StatusCode::SERVICE_UNAVAILABLE, "no state".to_string()))
}

/// The checks both profile routes start with: the token, a well-formed id, the state.
fn profile_request(
    s: &HttpState,
    headers: &HeaderMap,
    id: String,
) -> Result<(Store, ProfileId), Refused> {
    authorize(s, headers)?;
    sharded_refuses(s)?;
    if !id.starts_with("p-") || id.len() != 22 || !id[2..].bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err((
            StatusCode::BAD_REQUEST,
            "malformed profile id: expected p- and 20 hex digits".into(),
        ));
    }
    Ok((state(s)?, ProfileId(id)))
}

/// Answers with `f` applied to a profile found by any of its ids (redirects followed): `f` gets the id
/// asked for, the live id and its node. Read off the async threads.
async fn for_profile<T: Serialize + Send + 'static>(
    s: HttpState,
    headers: HeaderMap,
    id: String,
    f: fn(&Store, &ProfileId, &ProfileId, NodeId) -> Found<T>,
) -> Response {
    let (store, asked) = match profile_request(&s, &headers, id) {
        Ok(x) => x,
        Err((status, message)) => return error(status, message),
    };
    let answer = tokio::task::spawn_blocking(move || match store.resolve_profile_id(&asked)? {
        Some((live, node)) => f(&store, &asked, &live, node),
        None => Ok(None),
    })
    .await;
    respond(answer)
}

async fn by_profile_id(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    for_profile(s, headers, id, |store, asked, live, node| {
        let redirected_from = (live != asked).then(|| asked.to_string());
        load(store, node, redirected_from)
    })
    .await
}

async fn explain_profile(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    for_profile(s, headers, id, |store, _, _, node| {
        crate::inspect::inspection(store, node)
    })
    .await
}

/// The checks both identifier routes start with: the token, the identifier normalised as in stitching
/// (for a hashed type: the clear value hashed on arrival, or the hash as consumers see it), the state.
fn identifier_request(
    s: &HttpState,
    headers: &HeaderMap,
    kind: &str,
    value: &str,
) -> Result<(Store, Vec<crate::model::Identifier>), Refused> {
    authorize(s, headers)?;
    let ids = s.normalizer.lookup_candidates(kind, value).map_err(|r| {
        (
            StatusCode::BAD_REQUEST,
            format!("identifier refused: {}", r.as_str()),
        )
    })?;
    Ok((state(s)?, ids))
}

/// Answers with `f` applied to the profile holding an identifier, read off the async threads.
async fn for_identifier<T: Serialize + Send + 'static>(
    s: HttpState,
    headers: HeaderMap,
    (kind, value): (String, String),
    f: fn(&Store, NodeId) -> Found<T>,
) -> Response {
    let (store, ids) = match identifier_request(&s, &headers, &kind, &value)
        .and_then(|x| sharded_refuses(&s).map(|()| x))
    {
        Ok(x) => x,
        Err((status, message)) => return error(status, message),
    };
    let answer = tokio::task::spawn_blocking(move || {
        for id in &ids {
            if let Some(node) = store.node_of(id)? {
                return f(&store, node);
            }
        }
        Ok(None)
    })
    .await;
    respond(answer)
}

async fn by_identifier(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(key): Path<(String, String)>,
) -> Response {
    match s.shards.clone() {
        Some(shards) => sharded_identifier(s, headers, key, shards).await,
        None => for_identifier(s, headers, key, |store, node| load(store, node, None)).await,
    }
}

/// An identifier lookup in scale-out mode: each candidate identifier ([`Normalizer::lookup_candidates`]) is
/// climbed through the shards held here ([`lookup`]), and the rest of a climb that reaches a shard held
/// elsewhere is forwarded to its owner.
async fn sharded_identifier(
    s: HttpState,
    headers: HeaderMap,
    (kind, value): (String, String),
    (held, owners): (HeldShards, Owners),
) -> Response {
    let (store, ids) = match identifier_request(&s, &headers, &kind, &value) {
        Ok(x) => x,
        Err((status, message)) => return error(status, message),
    };
    for id in ids {
        let answer = climb_from(&s, store.clone(), held.clone(), &owners, id, 0).await;
        if answer.status() != StatusCode::NOT_FOUND {
            return answer;
        }
    }
    error(StatusCode::NOT_FOUND, "no profile for this id")
}

/// Set on an answer that another instance gave (the lookup was forwarded).
pub const FORWARDED_HEADER: &str = "stitcher-forwarded";

/// Most forwards of one lookup: a climb visits at most every shard once.
const MAX_HOPS: u32 = 16;

#[derive(serde::Deserialize)]
struct Hops {
    #[serde(default)]
    hops: u32,
}

/// `GET /internal/v1/climb/{type}/{value}?hops=n`: the rest of a climb forwarded by another instance, from
/// an identifier already normalised (never normalised again: a hash stays a hash).
async fn climb(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path((kind, value)): Path<(String, String)>,
    axum::extract::Query(Hops { hops }): axum::extract::Query<Hops>,
) -> Response {
    if let Err((status, message)) = authorize(&s, &headers) {
        return error(status, message);
    }
    let (Some((held, owners)), Ok(store)) = (s.shards.clone(), state(&s)) else {
        return error(StatusCode::NOT_FOUND, "not a scale-out instance");
    };
    climb_from(&s, store, held, &owners, Identifier::new(kind, value), hops).await
}

/// Climbs from `id` through the shards held here; forwards the rest to the owner of the next shard.
async fn climb_from(
    s: &HttpState,
    store: Store,
    held: HeldShards,
    owners: &Owners,
    id: Identifier,
    hops: u32,
) -> Response {
    let answer = tokio::task::spawn_blocking(move || lookup(&store, &held, &id)).await;
    let (shard, at) = match answer {
        Ok(Ok(Lookup::Elsewhere { shard, at })) => (shard, at),
        other => {
            return respond(other.map(|found| {
                found.map(|l| match l {
                    Lookup::Found(p) => Some(LookupAnswer {
                        profile_id: p.id().to_string(),
                        redirected_from: None,
                        profile: (&*p).into(),
                    }),
                    Lookup::Unknown | Lookup::Elsewhere { .. } => None,
                })
            }))
        }
    };
    let rebalancing = |why: String| {
        let mut r = error(StatusCode::SERVICE_UNAVAILABLE, why);
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        r
    };
    if hops >= MAX_HOPS {
        return rebalancing(format!("lookup forwarded {hops} times: shards are moving"));
    }
    let who = owners.clone();
    let Ok(Some(owner)) = tokio::task::spawn_blocking(move || who.owner(shard)).await else {
        return rebalancing(format!(
            "shard {shard} is being reassigned between instances; retry"
        ));
    };
    let path = format!(
        "/internal/v1/climb/{}/{}?hops={}",
        percent_encode(&at.kind),
        percent_encode(&at.value),
        hops + 1
    );
    match routing::http_get(
        &owner,
        &path,
        s.bearer_token.as_deref(),
        std::time::Duration::from_secs(5),
    )
    .await
    {
        Ok((status, body)) if status == 200 || status == 404 || status == 503 => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            // Says that the answer came from another instance (for clients and benchmarks).
            let mut r = (
                status,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::HeaderName::from_static(FORWARDED_HEADER), "true"),
                ],
                body,
            )
                .into_response();
            if status == StatusCode::SERVICE_UNAVAILABLE {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            }
            r
        }
        Ok((status, _)) => error(
            StatusCode::BAD_GATEWAY,
            format!("the owner of shard {shard} answered {status}"),
        ),
        Err(e) => rebalancing(format!("the owner of shard {shard} is unreachable: {e}")),
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for a path segment.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn explain(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(key): Path<(String, String)>,
) -> Response {
    for_identifier(s, headers, key, crate::inspect::inspection).await
}

fn load(store: &Store, node: NodeId, redirected_from: Option<String>) -> Found<LookupAnswer> {
    Ok(store.profile(node)?.map(|p| LookupAnswer {
        profile_id: p.id().to_string(),
        redirected_from,
        profile: (&p).into(),
    }))
}

fn respond<T: Serialize>(answer: Result<Found<T>, tokio::task::JoinError>) -> Response {
    match answer {
        Ok(Ok(Some(a))) => Json(a).into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "no profile for this id"),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("state: {e}")),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("lookup task: {e}"),
        ),
    }
}
