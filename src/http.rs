//! HTTP: Prometheus `/metrics`, `/healthz`, `/readyz`, and the profile lookup used by call-centre screens.
//!
//! - `GET /v1/profiles/{profile_id}`: follows redirects of merged profiles.
//! - `GET /v1/identifiers/{type}/{value}`: the value is normalised (and hashed) exactly as in stitching.
//! - `GET /v1/identifiers/{type}/{value}/explain`, `GET /v1/profiles/{profile_id}/explain`: the profile
//!   with every identifier's links and their evidence, the events each anchors and the ids merged into it
//!   ([`crate::inspect`]).
//!
//! Answers come from the committed local copy of the shards. 404 for unknown ids, 400 for malformed ones.
//! With `http.bearer_token` set, the lookup routes require `Authorization: Bearer <token>`.
//!
//! Every route answers on every instance. An identifier lookup reads the identifier's
//! home shard (which shard owns its component) and the owner (the component), each here if held here,
//! else forwarded once to the instance holding it (`GET /internal/v1/lookup/...`,
//! [`crate::scaleout::routing`]). A profile-id lookup reads the shards held here and, if the id is not
//! there, asks every other instance (`GET /internal/v1/profiles/...`). 503 with `Retry-After` while the
//! shards are being reassigned.
//!
//! Read-your-writes: every profile answer says what it reflects (`reflects`: the profile's identity version
//! and, per input partition, the largest offset of an event in it). `?after=topic:partition:offset` (comma
//! separated for several) and `?min_version=n` make the lookup wait, up to `?wait_ms=` (default 5,000, at
//! most 30,000), until the answer reflects at least that; then 504 saying what it does reflect.

use std::sync::Arc;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::codec::update::ProfileRecord;
use crate::inspect::{inspection, GraphRead};
use crate::metrics::Metrics;
use crate::model::Identifier;
use crate::model::{NodeId, ProfileId};
use crate::normalize::Normalizer;
use crate::profile::Enrichment;
use crate::scaleout::lookup::{lookup, profile_here, HeldShards, Lookup, Step};
use crate::scaleout::routing::{self, Owners};
use crate::scaleout::state::ShardRead;
use crate::store::Store;

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Metrics,
    pub store: Option<Store>,
    pub normalizer: Arc<Normalizer>,
    pub bearer_token: Option<String>,
    /// The shards this instance holds and where the others are (a lookup that needs a shard held
    /// elsewhere is forwarded there).
    pub held: HeldShards,
    pub owners: Owners,
    /// How much of the story a profile shows (`[enrichment]`).
    pub enrichment: Arc<Enrichment>,
}

#[derive(Serialize)]
struct LookupAnswer {
    profile_id: String,
    /// The id asked for, when it was merged into `profile_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    redirected_from: Option<String>,
    profile: ProfileRecord,
    reflects: Reflects,
}

/// What state a profile answer reflects.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
struct Reflects {
    /// The profile's identity version (the identity change stream's `version`).
    version: u64,
    /// `topic:partition` -> the largest offset of an event in the profile.
    offsets: std::collections::BTreeMap<String, i64>,
}

#[derive(Serialize)]
struct ErrorAnswer {
    error: String,
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ErrorAnswer { error: msg.into() })).into_response()
}

/// axum's `Path` and `Query`, refusing as every other answer does: the status and a JSON `error` (axum's
/// own refusals were plain text, `Failed to deserialize query string: ...`).
struct Path<T>(T);
struct Query<T>(T);

#[axum::async_trait]
impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(t)) => Ok(Self(t)),
            Err(r) => Err(error(r.status(), r.body_text())),
        }
    }
}

#[axum::async_trait]
impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(t)) => Ok(Self(t)),
            Err(r) => Err(error(r.status(), r.body_text())),
        }
    }
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/profiles/:id", get(by_profile_id))
        .route("/v1/profiles/:id/explain", get(explain_profile))
        .route("/v1/identifiers/:kind/:value", get(by_identifier))
        .route("/v1/identifiers/:kind/:value/explain", get(explain))
        .route("/internal/v1/lookup/:kind/:value", get(forwarded_lookup))
        .route("/internal/v1/profiles/:id", get(forwarded_profile))
        .fallback(|uri: axum::http::Uri| async move {
            error(
                StatusCode::NOT_FOUND,
                format!("no route {}: see README \"HTTP\"", uri.path()),
            )
        })
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

/// 200 while the process can make progress by itself, else 503 with the reason
/// ([`crate::metrics::Health::live`]).
async fn healthz(State(s): State<HttpState>) -> impl IntoResponse {
    match s.metrics.health.live() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("hung: {why}\n")),
    }
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
    let id = ProfileId::parse(&id).ok_or((
        StatusCode::BAD_REQUEST,
        crate::model::MALFORMED_PROFILE_ID.to_string(),
    ))?;
    Ok((state(s)?, id))
}

/// Answers with `what` of a profile found by any of its ids (redirects followed), read off the async
/// threads: from the shards held here, or else from the instance that holds it.
async fn for_profile(s: HttpState, headers: HeaderMap, id: String, what: What) -> Response {
    let (store, asked) = match profile_request(&s, &headers, id) {
        Ok(x) => x,
        Err((status, message)) => return error(status, message),
    };
    let (held, owners) = (s.held.clone(), s.owners.clone());
    let here = {
        let (store, held, asked, cfg) = (
            store.clone(),
            held.clone(),
            asked.clone(),
            s.enrichment.clone(),
        );
        tokio::task::spawn_blocking(move || {
            store.settled(|| profile_here_rendered(&store, &held, &asked, (what, &cfg)))
        })
        .await
    };
    if !matches!(here, Ok(Ok(None))) {
        return respond(here);
    }
    // Not in the shards held here: every other instance looks in its own.
    let Ok(Some(others)) = tokio::task::spawn_blocking(move || owners.others(held.count())).await
    else {
        return rebalancing("shards are being reassigned between instances; retry".into());
    };
    let path = format!(
        "/internal/v1/profiles/{}?what={}",
        asked.as_str(),
        what.as_str()
    );
    let mut unsure = None;
    for addr in others {
        match forward(&s, &addr, &path).await {
            Ok(r) if r.status() == StatusCode::NOT_FOUND => {}
            Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => unsure = Some(r),
            Ok(r) => return r,
            Err(e) => unsure = Some(rebalancing(format!("instance {addr} is unreachable: {e}"))),
        }
    }
    unsure.unwrap_or_else(|| error(StatusCode::NOT_FOUND, "no profile for this id"))
}

/// A profile id in the shards held here, rendered; `None` if it is not here.
fn profile_here_rendered(
    store: &Store,
    held: &HeldShards,
    asked: &ProfileId,
    what: (What, &Enrichment),
) -> Found<serde_json::Value> {
    match profile_here(store, held, asked)? {
        Some((shard, live, node)) => {
            let read = ShardRead { kv: store, shard };
            render(&read, node, what, redirected(asked, &live))
        }
        None => Ok(None),
    }
}

fn redirected(asked: &ProfileId, live: &ProfileId) -> Option<String> {
    (live != asked).then(|| asked.to_string())
}

async fn by_profile_id(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(select): Query<Select>,
    Query(fresh): Query<Fresh>,
) -> Response {
    let answer = fresh
        .wait(|| for_profile(s.clone(), headers.clone(), id.clone(), What::Profile))
        .await;
    select.apply(answer).await
}

/// `?after=topic:partition:offset,...&min_version=n&wait_ms=m`: a lookup that must reflect at least those
/// input offsets (per partition, the largest offset of an event in the profile) or that identity version.
#[derive(Debug, Default, serde::Deserialize)]
struct Fresh {
    after: Option<String>,
    min_version: Option<u64>,
    wait_ms: Option<u64>,
}

/// How long a read-your-writes lookup waits by default, and at most.
const FRESH_WAIT_MS: (u64, u64) = (5_000, 30_000);
/// How often it looks again.
const FRESH_POLL: std::time::Duration = std::time::Duration::from_millis(20);

impl Fresh {
    /// The offsets asked for, parsed.
    fn offsets(&self) -> Result<Vec<(String, i64)>, String> {
        let Some(after) = &self.after else {
            return Ok(vec![]);
        };
        after
            .split(',')
            .filter(|a| !a.is_empty())
            .map(|a| match crate::model::Origin::parse(a) {
                Some(o) => Ok((format!("{}:{}", o.topic, o.partition), o.offset)),
                None => Err(format!(
                    "after: {a:?} is not topic:partition:offset (comma separated for several)"
                )),
            })
            .collect()
    }

    /// What an answer lacks of what was asked for (`None`: it reflects all of it).
    fn lacking(&self, offsets: &[(String, i64)], r: &Reflects) -> Option<String> {
        let mut lacking: Vec<String> = offsets
            .iter()
            .filter(|(at, o)| r.offsets.get(at).is_none_or(|have| have < o))
            .map(|(at, o)| {
                let have = r
                    .offsets
                    .get(at)
                    .map_or("none".to_string(), |h| h.to_string());
                format!("offset {o} of {at} (it has {have})")
            })
            .collect();
        if let Some(v) = self.min_version.filter(|v| *v > r.version) {
            lacking.push(format!("version {v} (it has {})", r.version));
        }
        (!lacking.is_empty()).then(|| lacking.join(", "))
    }

    /// Runs `lookup` until its answer reflects what was asked for, or the wait is over: then 504 saying
    /// what the state lacks. A profile not found yet (the event that creates it is on its way) and an
    /// assignment moving (503) are waited for too; other answers are final.
    async fn wait<F, Fut>(self, lookup: F) -> Response
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Response>,
    {
        if self.after.is_none() && self.min_version.is_none() {
            return lookup().await;
        }
        let offsets = match self.offsets() {
            Ok(o) => o,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        };
        let wait = self.wait_ms.unwrap_or(FRESH_WAIT_MS.0).min(FRESH_WAIT_MS.1);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait);
        loop {
            let answer = lookup().await;
            let status = answer.status();
            let why = match status {
                StatusCode::OK => {
                    let (parts, body) = answer.into_parts();
                    let body = match axum::body::to_bytes(body, MAX_ANSWER_BYTES).await {
                        Ok(b) => b,
                        Err(e) => {
                            return error(StatusCode::INTERNAL_SERVER_ERROR, format!("answer: {e}"))
                        }
                    };
                    let reflects = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| {
                            serde_json::from_value::<Reflects>(v["reflects"].clone()).ok()
                        })
                        .unwrap_or_default();
                    match self.lacking(&offsets, &reflects) {
                        None => return Response::from_parts(parts, axum::body::Body::from(body)),
                        Some(lacking) => format!("the profile does not reflect {lacking} yet"),
                    }
                }
                StatusCode::NOT_FOUND | StatusCode::SERVICE_UNAVAILABLE => {
                    format!("no answer reflecting it yet (last: {status})")
                }
                _ => return answer,
            };
            if tokio::time::Instant::now() + FRESH_POLL > deadline {
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("waited {wait} ms: {why}; the pipeline may be behind (see stitcher_consumer_lag_messages)"),
                );
            }
            tokio::time::sleep(FRESH_POLL).await;
        }
    }
}

/// `?fields=timeline,errand,traits`: the parts of the profile a lookup answers with (all without it), so
/// that a call-centre screen stays light.
#[derive(Debug, Default, serde::Deserialize)]
struct Select {
    fields: Option<String>,
}

/// Largest lookup answer read back to select from (a profile update is bounded by
/// `output.max_record_bytes`; its JSON is larger).
const MAX_ANSWER_BYTES: usize = 16 << 20;

impl Select {
    async fn apply(self, answer: Response) -> Response {
        let Some(fields) = self.fields else {
            return answer;
        };
        if answer.status() != StatusCode::OK {
            return answer;
        }
        let forwarded = answer.headers().get(FORWARDED_HEADER).cloned();
        let body = match axum::body::to_bytes(answer.into_body(), MAX_ANSWER_BYTES).await {
            Ok(b) => b,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("answer: {e}")),
        };
        let mut value: serde_json::Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("answer: {e}")),
        };
        if let Some(profile) = value.get_mut("profile").and_then(|p| p.as_object_mut()) {
            let wanted: Vec<&str> = fields
                .split(',')
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .collect();
            if let Some(unknown) = wanted.iter().find(|f| !profile.contains_key(**f)) {
                let known: Vec<&str> = profile.keys().map(String::as_str).collect();
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "fields: no {unknown:?} in a profile; one of {}",
                        known.join(", ")
                    ),
                );
            }
            profile.retain(|k, _| wanted.contains(&k.as_str()));
        }
        let mut r = Json(value).into_response();
        if let Some(h) = forwarded {
            r.headers_mut().insert(FORWARDED_HEADER, h);
        }
        r
    }
}

async fn explain_profile(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    for_profile(s, headers, id, What::Explain).await
}

/// `GET /internal/v1/profiles/{id}?what=...`: a profile-id lookup in the shards held here only, asked by
/// another instance; 503 while this instance holds no shard (it is restoring).
async fn forwarded_profile(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<Forwarded>,
) -> Response {
    let (store, asked) = match profile_request(&s, &headers, id) {
        Ok(x) => x,
        Err((status, message)) => return error(status, message),
    };
    let held = s.held.clone();
    if held.is_empty() {
        return rebalancing("this instance holds no shard yet; retry".into());
    }
    let (what, cfg) = (q.what, s.enrichment.clone());
    let answer = tokio::task::spawn_blocking(move || {
        store.settled(|| profile_here_rendered(&store, &held, &asked, (what, &cfg)))
    })
    .await;
    respond(answer)
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

async fn by_identifier(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(key): Path<(String, String)>,
    Query(select): Query<Select>,
    Query(fresh): Query<Fresh>,
) -> Response {
    let answer = fresh
        .wait(|| identifier(s.clone(), headers.clone(), key.clone(), What::Profile))
        .await;
    select.apply(answer).await
}

async fn explain(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(key): Path<(String, String)>,
) -> Response {
    identifier(s, headers, key, What::Explain).await
}

/// What a lookup answers with: the profile, or its explanation.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum What {
    #[default]
    Profile,
    Explain,
}

impl What {
    fn as_str(self) -> &'static str {
        match self {
            What::Profile => "profile",
            What::Explain => "explain",
        }
    }
}

fn render(
    read: &dyn GraphRead,
    node: NodeId,
    (what, cfg): (What, &Enrichment),
    redirected_from: Option<String>,
) -> Found<serde_json::Value> {
    let value = match what {
        What::Profile => load(read, node, redirected_from, cfg)?.map(serde_json::to_value),
        What::Explain => inspection(read, node, cfg)?.map(serde_json::to_value),
    };
    Ok(value.transpose().unwrap_or(None))
}

/// An identifier lookup: each candidate identifier ([`Normalizer::lookup_candidates`]) from its home
/// shard on ([`lookup`]); a step held elsewhere is forwarded to its holder.
async fn identifier(
    s: HttpState,
    headers: HeaderMap,
    (kind, value): (String, String),
    what: What,
) -> Response {
    let (held, owners) = (s.held.clone(), s.owners.clone());
    let (store, ids) = match identifier_request(&s, &headers, &kind, &value) {
        Ok(x) => x,
        Err((status, message)) => return error(status, message),
    };
    for id in ids {
        let answer = resolve(
            &s,
            (store.clone(), held.clone(), &owners),
            id,
            Step::Home,
            what,
            0,
        )
        .await;
        if answer.status() != StatusCode::NOT_FOUND {
            return answer;
        }
    }
    error(StatusCode::NOT_FOUND, "no profile for this id")
}

/// Set on an answer that another instance gave (the lookup was forwarded).
pub const FORWARDED_HEADER: &str = "stitcher-forwarded";

/// Most forwards of one lookup: the home, the owner, and owners the component moved to meanwhile.
const MAX_HOPS: u32 = 8;

/// The query of a lookup forwarded by another instance.
#[derive(serde::Deserialize)]
struct Forwarded {
    #[serde(default)]
    hops: u32,
    /// `home`, or the number of the shard that owns (or owned) the component.
    #[serde(default)]
    step: Option<String>,
    #[serde(default)]
    what: What,
}

/// `GET /internal/v1/lookup/{type}/{value}?step=..&what=..&hops=n`: an identifier lookup forwarded by
/// another instance, from an identifier already normalised (never normalised again: a hash stays a hash).
async fn forwarded_lookup(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path((kind, value)): Path<(String, String)>,
    Query(q): Query<Forwarded>,
) -> Response {
    if let Err((status, message)) = authorize(&s, &headers) {
        return error(status, message);
    }
    let store = match state(&s) {
        Ok(store) => store,
        Err((status, message)) => return error(status, message),
    };
    let (held, owners) = (s.held.clone(), s.owners.clone());
    let step = match q.step.as_deref() {
        None | Some("home") => Step::Home,
        Some(n) => match n.parse() {
            Ok(shard) => Step::Owner(shard),
            Err(_) => return error(StatusCode::BAD_REQUEST, "step: home or a shard number"),
        },
    };
    let id = Identifier::new(kind, value);
    resolve(&s, (store, held, &owners), id, step, q.what, q.hops).await
}

fn rebalancing(why: String) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, why);
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

/// Looks `id` up from `step` in the shards held here; forwards the rest to the holder of the next shard.
async fn resolve(
    s: &HttpState,
    (store, held, owners): (Store, HeldShards, &Owners),
    id: Identifier,
    step: Step,
    what: What,
    hops: u32,
) -> Response {
    let (key, cfg) = (id.clone(), s.enrichment.clone());
    let answer = tokio::task::spawn_blocking(move || {
        store.settled(|| {
            Ok(match lookup(&store, &held, &key, step)? {
                Lookup::Found { shard, node } => {
                    let read = ShardRead { kv: &store, shard };
                    Err(render(&read, node, (what, &cfg), None))
                }
                Lookup::Unknown => Err(Ok(None)),
                Lookup::Elsewhere(step) => Ok(step),
            })
        })
    })
    .await;
    let step = match answer {
        Ok(Ok(Ok(step))) => step,
        Ok(Ok(Err(found))) => return respond(Ok(found)),
        Ok(Err(e)) => return respond::<()>(Ok(Err(e))),
        Err(e) => return respond::<()>(Err(e)),
    };
    if hops >= MAX_HOPS {
        return rebalancing(format!("lookup forwarded {hops} times: shards are moving"));
    }
    let (shard, step_param) = match step {
        Step::Home => (
            crate::scaleout::home(&id, s.held.count()),
            "home".to_string(),
        ),
        Step::Owner(shard) => (shard, shard.to_string()),
    };
    let who = owners.clone();
    let Ok(Some(owner)) = tokio::task::spawn_blocking(move || who.owner(shard)).await else {
        return rebalancing(format!(
            "shard {shard} is being reassigned between instances; retry"
        ));
    };
    let path = format!(
        "/internal/v1/lookup/{}/{}?step={step_param}&what={}&hops={}",
        percent_encode(&id.kind),
        percent_encode(&id.value),
        what.as_str(),
        hops + 1
    );
    match forward(s, &owner, &path).await {
        Ok(r) => r,
        Err(e) => rebalancing(format!("the owner of shard {shard} is unreachable: {e}")),
    }
}

/// Asks another instance; its answer (200, 404 or 503) is passed on, marked as forwarded.
async fn forward(s: &HttpState, addr: &str, path: &str) -> Result<Response, String> {
    match routing::http_get(
        addr,
        path,
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
            Ok(r)
        }
        Ok((status, _)) => Ok(error(
            StatusCode::BAD_GATEWAY,
            format!("instance {addr} answered {status}"),
        )),
        Err(e) => Err(e.to_string()),
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

fn load(
    store: &dyn GraphRead,
    node: NodeId,
    redirected_from: Option<String>,
    cfg: &Enrichment,
) -> Found<LookupAnswer> {
    Ok(store.profile(node)?.map(|p| LookupAnswer {
        profile_id: p.id().to_string(),
        redirected_from,
        profile: ProfileRecord::new(&p, cfg),
        reflects: Reflects {
            version: p.version,
            offsets: p
                .positions
                .iter()
                .map(|((topic, partition), offset)| (format!("{topic}:{partition}"), *offset))
                .collect(),
        },
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
