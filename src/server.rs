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
use crate::actors::{Core, Deps, gates::Gates, incoming};
use crate::admission::Admission;
use crate::config::{Settings, TransportKind};
use crate::domain::receipt::Keywords;
use crate::http::request_span::RequestSpan;
use crate::http::{AppState, routes};
use crate::provider::{Providers, RateLedger};
use crate::secret::redact_url;
use crate::store::{ReceiptTimeouts, Store};
use crate::telemetry::Metrics;
use crate::transport::rabbitmq::{BrokerLink, LinkActor, RabbitTransport};
use crate::transport::{InProcess, Transport};

/// How long a stop may take past its deadline to give the instance's leases back.
const LEASE_RELEASE: Duration = Duration::from_secs(1);

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
    // A pool of its own for API requests: background work cannot take every connection.
    let requests = Store::connect(
        settings.database.url.expose(),
        settings.database.api_pool_size,
        Duration::from_millis(settings.database.acquire_timeout_ms),
    )
    .context("opening the database pool for requests")?;
    let metrics = Metrics::new().context("registering metrics")?;
    // What providers receive (receipts, inbound messages) goes to the instance's desk.
    let (incoming, incoming_rx) = tokio::sync::mpsc::channel(incoming::CHANNEL);
    // Every rate limit holds for its account across the instances sharing the database.
    let ledger: Arc<dyn RateLedger> = Arc::new(store.clone());
    let providers = Providers::from_settings(&settings.providers, &incoming, Some(ledger))
        .context("building the providers")?;
    let (desk_stop, desk_stop_rx) = tokio::sync::watch::channel(false);
    let desk = actix::spawn(incoming::run(
        incoming::Desk {
            store: store.clone(),
            metrics: metrics.clone(),
            keywords: Keywords::new(&settings.opt_out.stop_words, &settings.opt_out.start_words),
            region: settings.region()?,
            timeouts: ReceiptTimeouts(providers.receipt_timeouts()),
        },
        incoming_rx,
        desk_stop_rx,
    ));
    for configured in crate::provider::configure(&settings.providers)? {
        metrics.expose_provider(&configured.name);
    }
    let core = Core {
        store: store.clone(),
        requests: requests.clone(),
        providers: providers.clone(),
        metrics: metrics.clone(),
        settings: settings.clone(),
        gates: Gates::default(),
        region: settings.region()?,
        instance: instance.clone(),
        steps: Admission::new(settings.smsbatch.active_steps),
    };
    let workers = (0..settings.smsbatch.worker_count)
        .map(|_| PartitionWorker::new(core.clone()).start().recipient())
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
    let providers_for_shutdown = providers.clone();
    let shutdown_timeout = Duration::from_millis(settings.smsbatch.shutdown_timeout_ms);
    let state = AppState {
        broker: broker.clone(),
        store: requests,
        registry: registry.clone(),
        metrics,
        settings: settings.clone(),
        providers,
        incoming,
    };
    let mut server = HttpServer::new(move || {
        let state = state.clone();
        App::new()
            .wrap(TracingLogger::<RequestSpan>::new())
            .configure(move |cfg| routes(cfg, state))
    })
    .disable_signals()
    .shutdown_timeout(shutdown_timeout.as_secs());
    if settings.http.workers > 0 {
        server = server.workers(settings.http.workers);
    }
    // Listening for the stop signals before the address is printed: a SIGTERM sent as soon as
    // the service says it listens must stop it gracefully, not kill it.
    let stop_signal = StopSignal::listen();
    let server = server
        .bind(&settings.http.bind)
        .with_context(|| format!("binding http.bind = {}", settings.http.bind))?;
    // The dashboard's address on a line of its own: the first line is what scripts read. A
    // script may close the pipe once it has read it; the service goes on serving (a failed
    // write is not an error, and `println!` would panic on it).
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        for addr in server.addrs() {
            let _ = writeln!(out, "smsbatch listening on http://{addr}");
        }
        for addr in server.addrs() {
            let _ = writeln!(out, "smsbatch dashboard at http://{addr}/ui/");
        }
        let _ = out.flush();
    }
    let server = server.run();
    let handle = server.handle();
    let serving = actix::spawn(server);

    stop_signal.wait().await;
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
    // Nothing is being sent any more: close the providers' sessions (SMPP's `unbind`).
    if tokio::time::timeout_at(deadline, providers_for_shutdown.shut_down())
        .await
        .is_err()
    {
        tracing::warn!("Provider sessions did not close in time.");
    }
    // The sessions are closed: the desk answers what it holds and stops.
    let _ = desk_stop.send(true);
    if tokio::time::timeout_at(
        deadline.max(tokio::time::Instant::now() + LEASE_RELEASE),
        desk,
    )
    .await
    .is_err()
    {
        tracing::warn!(
            "Receipts still being stored at the deadline; their providers send them again."
        );
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

/// SIGTERM or Ctrl-C, listened for from its creation on.
struct StopSignal {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl StopSignal {
    fn listen() -> Self {
        StopSignal {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok(),
        }
    }

    async fn wait(self) {
        #[cfg(unix)]
        if let Some(mut term) = self.term {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}
