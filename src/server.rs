//! Wiring: builds the store, the worker pool, the transport, the registry and the HTTP server,
//! recovers what a previous run left, serves until SIGTERM or Ctrl-C, then drains.

use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use actix_web::{App, HttpServer};
use anyhow::Context as _;
use tracing_actix_web::TracingLogger;

use crate::actors::registry::{BatchRegistry, Recover, Shutdown};
use crate::actors::worker::PartitionWorker;
use crate::actors::{Core, Deps, gates::Gates};
use crate::config::{Settings, TransportKind, redact_url};
use crate::http::{AppState, routes};
use crate::provider::Providers;
use crate::store::Store;
use crate::telemetry::Metrics;
use crate::transport::rabbitmq::{BrokerLink, LinkActor, RabbitTransport};
use crate::transport::{InProcess, Transport};

/// How long a stop may take past its deadline to give the instance's leases back.
const LEASE_RELEASE: Duration = Duration::from_secs(1);

/// Tunes glibc's malloc for a long-running service whose memory must not follow the size of a
/// batch; to be called before the process starts threads. Each setting is left to glibc where
/// the operator set its environment variable.
///
/// - Arenas capped at one per core (`MALLOC_ARENA_MAX`). glibc lets threads create up to eight
///   arenas per core, each keeping memory it freed: the service's threads (actix's, tokio's
///   blocking pool's) spread a long batch's allocations over more arenas than a short batch
///   reaches (`bench`, PostgreSQL in-process: peak 25.8 MB at 10,000 recipients, 31.8 MB at
///   1,000,000; with two arenas 24.5 and 27.9 MB).
/// - Blocks of 128 KiB and more mapped on their own and unmapped when freed, and the heap's
///   free top returned beyond 128 KiB (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`).
///   Those are glibc's defaults, but glibc raises both each time it unmaps a block, up to
///   32 MiB: from then on a chunk's buffers (its rows, the statement's arrays) came from the
///   heap and stayed with the process after being freed, more of them the longer the batch
///   (`bench`, PostgreSQL + RabbitMQ: peak 32.5–32.7 MB at 10,000 recipients, 38.5–40.7 MB at
///   1,000,000; with the thresholds fixed 33.1 and 37.1–37.9 MB).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(cores).unwrap_or(libc::c_int::MAX);
        let block = 128 * 1024;
        for (variable, parameter, value) in [
            ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, arenas),
            ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, block),
            ("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, block),
        ] {
            if std::env::var_os(variable).is_none() {
                // SAFETY: `mallopt` sets one of the allocator's parameters and touches nothing
                // else; it is documented as safe to call at any time, and this runs before
                // other threads exist.
                unsafe {
                    libc::mallopt(parameter, value);
                }
            }
        }
    }
}

/// Hands the allocator's free memory back to the system (glibc's `malloc_trim`), at the end of
/// a phase of a batch that went through many allocations (an upload, a preparation, a batch's
/// run). glibc returns only the free top of its main heap by itself: what a phase freed below
/// it stayed with the process and the next phase's peak came on top (`bench`, PostgreSQL +
/// RabbitMQ, `--pauses 0`: peak 31.7–33.0 MB at 10,000 recipients and 36.3–38.2 MB at
/// 1,000,000 before; 31.1–31.5 and 35.2–36.1 MB after).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only returns free pages of the allocator's heaps to the system; it
    // takes the allocator's own locks and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs the service inside the current actix `System` until a stop signal.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    let instance = uuid::Uuid::now_v7().to_string();
    let store = Store::connect(
        settings.database.url.expose(),
        settings.database.pool_size,
        Duration::from_millis(settings.database.acquire_timeout_ms),
    )
    .context("opening the database pool")?;
    let metrics = Metrics::new().context("registering metrics")?;
    let providers =
        Providers::from_settings(&settings.providers).context("building the providers")?;
    let core = Core {
        store: store.clone(),
        providers: providers.clone(),
        metrics: metrics.clone(),
        settings: settings.clone(),
        gates: Gates::default(),
        region: settings.region()?,
        instance: instance.clone(),
    };
    let workers = (0..settings.smsbatch.worker_count)
        .map(|_| PartitionWorker::new(core.clone()).start())
        .collect();
    let pool = Arc::new(InProcess::new(
        workers,
        settings.smsbatch.worker_mailbox,
        metrics.clone(),
    ));
    let (transport, broker): (Arc<dyn Transport>, Option<Arc<BrokerLink>>) =
        match settings.transport.kind {
            TransportKind::InProcess => (pool, None),
            TransportKind::Rabbitmq => {
                // The prefetch equals the pool's capacity: the broker never hands this instance
                // more tasks than its workers can hold.
                let link = BrokerLink::new(
                    &settings.transport,
                    pool.capacity(),
                    &instance,
                    metrics.clone(),
                );
                LinkActor::new(link.clone(), pool).start();
                (Arc::new(RabbitTransport(link.clone())), Some(link))
            }
        };
    let registry = BatchRegistry::new(Deps { core, transport }).start();
    let resumed = registry
        .send(Recover)
        .await
        .context("registry")?
        .context("recovering batches")?;
    tracing::info!(
        database = %redact_url(settings.database.url.expose()),
        transport = ?settings.transport.kind,
        instance = %instance,
        resumed,
        "Store ready."
    );

    let store_for_shutdown = store.clone();
    let shutdown_timeout = Duration::from_millis(settings.smsbatch.shutdown_timeout_ms);
    let state = AppState {
        broker: broker.clone(),
        store,
        registry: registry.clone(),
        metrics,
        settings: settings.clone(),
        providers,
    };
    let mut server = HttpServer::new(move || {
        let state = state.clone();
        App::new()
            .wrap(TracingLogger::default())
            .configure(move |cfg| routes(cfg, state))
    })
    .disable_signals()
    .shutdown_timeout(shutdown_timeout.as_secs());
    if settings.http.workers > 0 {
        server = server.workers(settings.http.workers);
    }
    let server = server
        .bind(&settings.http.bind)
        .with_context(|| format!("binding http.bind = {}", settings.http.bind))?;
    for addr in server.addrs() {
        println!("smsbatch listening on http://{addr}");
    }
    let server = server.run();
    let handle = server.handle();
    let serving = actix::spawn(server);

    wait_for_signal().await;
    tracing::info!("Stopping: no new work; draining what is in flight.");
    // One deadline for the whole stop: a step that cannot finish or checkpoint in time (stuck
    // on a lock, a database that does not answer) is left as it is, and the next start
    // continues it from its checkpoint.
    let deadline = tokio::time::Instant::now() + shutdown_timeout;
    // The registry answers by the deadline itself (saying what it could not drain), unless its
    // mailbox is stuck: a moment's grace for its answer.
    let answered = deadline + Duration::from_millis(250);
    if tokio::time::timeout_at(answered, registry.send(Shutdown(deadline.into_std())))
        .await
        .is_err()
    {
        tracing::warn!("Shutdown timeout reached with work still in flight.");
    }
    if let Some(broker) = &broker
        && tokio::time::timeout_at(deadline, broker.shut_down())
            .await
            .is_err()
    {
        tracing::warn!("Broker link did not settle its tasks in time.");
    }
    // Give the leases back, so another instance takes the batches over without waiting for them
    // to expire: worth a moment past the deadline, not more. The release runs as a task of its
    // own, left behind if it takes longer: a SQLite statement cannot be dropped half-way on this
    // runtime (diesel-async waits for it with `block_in_place`, which the current-thread
    // runtime refuses), and the process ends without waiting for it.
    let release = deadline.max(tokio::time::Instant::now() + LEASE_RELEASE);
    let forget = actix::spawn(async move { store_for_shutdown.forget_instance(&instance).await });
    match tokio::time::timeout_at(release, forget).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => {
            tracing::warn!(error = %e, "Leases not released; they expire on their own.")
        }
        Ok(Err(_)) | Err(_) => {
            tracing::warn!("Leases not released in time; they expire on their own.")
        }
    }
    if tokio::time::timeout_at(release, handle.stop(true))
        .await
        .is_err()
    {
        handle.stop(false).await;
    }
    serving.await.ok();
    tracing::info!("Stopped.");
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
