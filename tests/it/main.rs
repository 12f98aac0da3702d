//! The integration tests, in one binary: the real server over HTTP (`api`, `access`,
//! `bad_input`, `http_provider`, `export`, `resend`), the command-line client (`cli`), the fault
//! suite (`faults`), lifecycle races (`races`), the `smpp` provider against a real SMSC (`smpp`),
//! the store conformance suite (`store`), the deployment files (`deploy`), the monitored stack
//! (`monitoring`), traces over OTLP (`traces`) and the dashboard, in a real browser too (`ui`),
//! sharing the harness in `common`.

#[macro_use]
mod common;

mod access;
mod api;
mod bad_input;
mod cli;
mod deploy;
mod export;
mod faults;
mod http_provider;
mod many;
mod monitoring;
mod opt_outs;
mod provider_http;
mod races;
mod receipts;
mod resend;
mod smpp;
mod smpp_account;
mod store;
mod traces;
mod turns;
mod ui;
