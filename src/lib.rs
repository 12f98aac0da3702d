//! smsbatch: an SMS batch orchestrator. An operator hands it a campaign — a template and a list
//! of recipients — and it validates, renders and sends every message through SMS providers,
//! while the batch is started, paused, resumed or cancelled over a REST API.
//!
//! The modules follow the boxes of docs/design.md: `domain` (pure rules), `store` (the database),
//! `actors` (registry, supervisors, workers), `transport`, `provider`, `http`, and above them
//! `cli`, the command-line client, which talks to a server over HTTP only.

pub mod actors;
pub mod admission;
pub mod cli;
pub mod config;
pub mod domain;
pub mod http;
pub mod memory;
pub mod provider;
pub mod secret;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod transport;
