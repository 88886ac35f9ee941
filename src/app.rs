//! Wiring: state, HTTP, topics, the pipeline thread, and an orderly stop.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::{self, HttpState};
use crate::kafka::CommitError;
use crate::metrics::Metrics;
use crate::normalize::Normalizer;
use crate::pipeline::{Pipeline, PipelineError, RunSummary};
use crate::scaleout::lookup::HeldShards;
use crate::scaleout::routing::Owners;
use crate::store::Store;

/// Runs the service until `shutdown` is cancelled, or the pipeline fails.
pub async fn run(
    mut cfg: Config,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<RunSummary> {
    let store = open_store(&cfg).await?;
    crate::pipeline::check_state(&cfg, &store)?;
    let listener = TcpListener::bind(cfg.http.listen)
        .await
        .with_context(|| format!("cannot listen on {} (http.listen)", cfg.http.listen))?;
    let held = HeldShards::new(cfg.scaleout.shards);
    tracing::info!(addr = %listener.local_addr()?, "http listening");
    if let Some(why) = crate::scaleout::routing::unroutable(&cfg.http.advertised()) {
        tracing::warn!("lookups cannot be forwarded here from other instances: {why}");
    }
    let http_state = HttpState {
        metrics: metrics.clone(),
        store: Some(store.clone()),
        normalizer: Arc::new(Normalizer::new(&cfg.identity)?),
        bearer_token: cfg.http.bearer_token.clone(),
        held: held.clone(),
        owners: Owners::new(&cfg),
        enrichment: Arc::new(cfg.enrichment.clone()),
    };
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(http::serve(listener, http_state, http_stop.clone()));
    let sizes = tokio::spawn(report_state_size(
        store.clone(),
        metrics.clone(),
        http_stop.clone(),
    ));
    let readiness = tokio::spawn(log_readiness(metrics.clone(), http_stop.clone()));

    let result = match start_up(&mut cfg, &shutdown).await {
        Ok(Started::Yes) => run_pipeline(cfg, store, metrics, held, shutdown).await,
        Ok(Started::StoppedBefore) => {
            tracing::info!("stopped before the pipeline started");
            Ok(RunSummary::default())
        }
        Err(e) => Err(e),
    };
    http_stop.cancel();
    let _ = http.await;
    let _ = sizes.await;
    let _ = readiness.await;
    result
}

/// Runs the pipeline on a thread of its own until `shutdown`, or until it fails.
async fn run_pipeline(
    cfg: Config,
    store: Store,
    metrics: Metrics,
    held: HeldShards,
    shutdown: CancellationToken,
) -> anyhow::Result<RunSummary> {
    let instance = cfg.kafka.instance_id.clone();
    Ok(tokio::task::spawn_blocking(move || {
        match Pipeline::start(cfg, store, metrics, &instance, held, &shutdown) {
            Ok(pipeline) => pipeline.run(shutdown),
            Err(PipelineError::Commit(CommitError::Stopped)) => {
                tracing::info!("stopped before the pipeline started");
                Ok(RunSummary::default())
            }
            Err(e) => Err(e),
        }
    })
    .await??)
}

/// Whether the start-up got through, or a stop came while it waited for Kafka or the schema registry.
enum Started {
    Yes,
    StoppedBefore,
}

/// Waits for the brokers (and the schema registry, when configured), registers the output schema and fits
/// the record limit to the topics'. A stop while it waits ends it: not a failure.
async fn start_up(cfg: &mut Config, shutdown: &CancellationToken) -> anyhow::Result<Started> {
    if !connect(cfg, shutdown).await? {
        return Ok(Started::StoppedBefore);
    }
    if cfg.registry.enabled() {
        match register_output(cfg, shutdown).await? {
            Some(id) => cfg.output.schema_id = id,
            None => return Ok(Started::StoppedBefore),
        }
    }
    if cfg.output.read_topic_configs {
        fit_record_limit(cfg).await;
        check_changelog_policy(cfg).await?;
    }
    Ok(Started::Yes)
}

/// Opens (or creates) the state at `state.dir`; an error names the directory, and a lock held by another
/// process says so.
async fn open_store(cfg: &Config) -> anyhow::Result<Store> {
    let dir = cfg.state.dir.clone();
    let cache = cfg.state.block_cache_mb;
    let cannot = || format!("cannot open the state at {} (state.dir)", dir.display());
    std::fs::create_dir_all(&dir).with_context(cannot)?;
    let opened = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || Store::open(&dir, cache)).await?
    };
    opened.map_err(|e| {
        let held = e.to_string().contains("LOCK");
        anyhow::Error::new(e).context(if held {
            format!(
                "{}: another process holds it (each instance needs a state.dir of its own)",
                cannot()
            )
        } else {
            cannot()
        })
    })
}

/// Waits until the brokers answer with these credentials (logging why not), then creates missing topics if
/// configured to. `false`: stopped while waiting.
async fn connect(cfg: &Config, shutdown: &CancellationToken) -> anyhow::Result<bool> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let (probe, stop) = (cfg.clone(), shutdown.clone());
        let reachable =
            tokio::task::spawn_blocking(move || crate::kafka::check_connection(&probe, &stop))
                .await?;
        let result = match reachable {
            Ok(()) if cfg.output.create_topics => crate::kafka::ensure_topics(cfg).await,
            other => other,
        };
        match result {
            Ok(()) => return Ok(true),
            Err(e) if shutdown.is_cancelled() => {
                tracing::info!(error = %e, "stopped while waiting for kafka");
                return Ok(false);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach kafka or create topics yet, retrying");
                pause(&mut backoff, shutdown).await;
            }
        }
    }
}

/// Waits `backoff` (or until shutdown), then doubles it up to five seconds: between start-up attempts.
async fn pause(backoff: &mut Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(*backoff) => {}
        _ = shutdown.cancelled() => {}
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
}

/// Registers the output schema under `<output.topic>-value` after the registry's compatibility check and
/// returns its id. An unreachable registry is asked again with backoff (the instance is not ready
/// meanwhile; `None`: stopped while waiting); an incompatible schema stops the start with an error that
/// says so.
async fn register_output(
    cfg: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<u32>> {
    let registry = Arc::new(crate::registry::Registry::new(&cfg.registry)?);
    let subject = format!("{}-value", cfg.output.topic);
    let mut backoff = Duration::from_millis(200);
    loop {
        let (r, s) = (registry.clone(), subject.clone());
        let result =
            tokio::task::spawn_blocking(move || r.register(&s, crate::codec::PROFILE_UPDATE_AVSC))
                .await?;
        match result {
            Ok(id) => {
                tracing::info!(subject, id, "output schema registered");
                return Ok(Some(id));
            }
            Err(e) if e.is_transient() && shutdown.is_cancelled() => {
                tracing::info!(error = %e, "stopped while waiting for the schema registry");
                return Ok(None);
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "the schema registry cannot answer yet, retrying");
                pause(&mut backoff, shutdown).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Lowers `output.max_record_bytes` to what the output and dead-letter topics accept, so that no record
/// this service produces is refused for its size.
async fn fit_record_limit(cfg: &mut Config) {
    match crate::kafka::topic_record_limit(cfg).await {
        Ok(Some(limit)) if limit < cfg.output.max_record_bytes => {
            tracing::info!(
                configured = cfg.output.max_record_bytes,
                topics = limit,
                "lowering output.max_record_bytes to the topics' max.message.bytes"
            );
            cfg.output.max_record_bytes = limit;
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(
            error = %e,
            max_record_bytes = cfg.output.max_record_bytes,
            "cannot read the topics' max.message.bytes; keeping output.max_record_bytes"
        ),
    }
}

/// Refuses a changelog whose cleanup policy deletes records: it is the shards' state, and a restore after
/// the retention would miss every older record of it (Kafka Streams refuses such a changelog too). A
/// cluster that does not let this service read topic configurations (its ACLs) leaves it unchecked, as
/// the record limit is.
async fn check_changelog_policy(cfg: &Config) -> Result<(), PipelineError> {
    let changelog = cfg.changelog_topic();
    let policies = match crate::kafka::topic_settings(cfg, &[changelog.as_str()], "cleanup.policy")
        .await
    {
        Ok(policies) => policies,
        Err(e) => {
            tracing::warn!(error = %e, topic = changelog.as_str(), "cannot read the changelog's cleanup.policy; not checked");
            return Ok(());
        }
    };
    match policies
        .iter()
        .find(|p| p.split(',').any(|x| x.trim() == "delete"))
    {
        Some(policy) => Err(PipelineError::InternalTopics(format!(
            "{changelog} has cleanup.policy={policy}: it is the shards' state, and a restore after \
             its retention would miss every older record of it. Set cleanup.policy=compact on it \
             (kafka-configs.sh --alter --entity-type topics --entity-name {changelog} --add-config \
             cleanup.policy=compact)"
        ))),
        None => Ok(()),
    }
}

/// Logs each time the instance becomes ready or stops being ready (as `/readyz` answers, looked at every
/// [`READINESS_EVERY`]), with the reason: a stall is in the log, not only in the probe's answers.
async fn log_readiness(metrics: Metrics, stop: CancellationToken) {
    let mut was_ready = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(READINESS_EVERY) => {}
            _ = stop.cancelled() => return,
        }
        match (was_ready, metrics.health.check()) {
            (false, Ok(())) => {
                tracing::info!("ready");
                was_ready = true;
            }
            (true, Err(why)) => {
                tracing::warn!(why, "not ready");
                was_ready = false;
            }
            _ => {}
        }
    }
}

const READINESS_EVERY: Duration = Duration::from_secs(5);

async fn report_state_size(store: Store, metrics: Metrics, stop: CancellationToken) {
    loop {
        let s = store.clone();
        let read = move || (s.approximate_sizes(), s.memory_usage());
        if let Ok((sizes, memory)) = tokio::task::spawn_blocking(read).await {
            for (cf, bytes) in sizes {
                metrics
                    .state_size
                    .with_label_values(&[cf])
                    .set(bytes as i64);
            }
            for (part, bytes) in memory {
                metrics
                    .state_memory
                    .with_label_values(&[part])
                    .set(bytes as i64);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(15)) => {}
            _ = stop.cancelled() => return,
        }
    }
}
