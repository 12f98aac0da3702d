//! The client's side of the REST API: one blocking `ureq` agent, the bearer token, and the
//! API's error body turned into a message a person can act on.

use std::time::Duration;

use serde_json::Value;
use ureq::http::Response;
use ureq::{Agent, Body, RequestBuilder};

/// The server when neither `--url` nor `SMSBATCH_URL` names one.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// What can go wrong in a client command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server answered an error: its status and the API's error body.
    #[error("{what}: the server answered {status} {code}: {message}{hint}")]
    Api {
        /// The request, `POST /v1/batches`.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The error body's `code` (or `http_error` when the body is not the API's).
        code: String,
        /// The error body's `message` (or the start of the body).
        message: String,
        /// A hint for a 401.
        hint: &'static str,
    },
    /// No answer: the server is down, the URL wrong, the connection lost.
    #[error("{what}: {cause}")]
    Unreachable {
        /// The request.
        what: String,
        /// Why.
        cause: String,
    },
    /// A local file, or stdout.
    #[error("{0}")]
    Io(String),
    /// The reader of stdout went away (`| head`): the command stops, and that is no error.
    #[error("stdout was closed")]
    Closed,
}

impl CliError {
    /// True when asking again later may succeed: no answer, or 503 `unavailable`.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CliError::Unreachable { .. } | CliError::Api { status: 503, .. }
        )
    }
}

/// A connection to the server's API.
pub struct Client {
    agent: Agent,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client of `url` (else `SMSBATCH_URL`, else [`DEFAULT_URL`]) with the token of
    /// `SMSBATCH_TOKEN`, if set.
    pub fn new(url: Option<&str>) -> Client {
        let base = url
            .map(str::to_owned)
            .or_else(|| std::env::var("SMSBATCH_URL").ok().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| DEFAULT_URL.to_owned());
        let token = std::env::var("SMSBATCH_TOKEN")
            .ok()
            .filter(|t| !t.is_empty());
        // No overall timeout: an upload or an export of a million rows takes as long as it
        // takes. A server that cannot be reached is told quickly.
        let agent: Agent = Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .build()
            .into();
        Client {
            agent,
            base: base.trim_end_matches('/').to_owned(),
            token,
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn authorized<T>(&self, request: RequestBuilder<T>) -> RequestBuilder<T> {
        match &self.token {
            Some(token) => request.header("Authorization", format!("Bearer {token}")),
            None => request,
        }
    }

    /// `GET path` with an `Accept` header, answered 2xx: the response, whose body the caller
    /// reads (a stream).
    pub fn get_stream(&self, path: &str, accept: &str) -> Result<Response<Body>, CliError> {
        let what = format!("GET {}{path}", self.base);
        let request = self
            .authorized(self.agent.get(format!("{}{path}", self.base)))
            .header("Accept", accept);
        checked(&what, request.call())
    }

    /// `GET path`, its JSON body.
    pub fn get(&self, path: &str) -> Result<Value, CliError> {
        let what = format!("GET {}{path}", self.base);
        let request = self.authorized(self.agent.get(format!("{}{path}", self.base)));
        json(&what, checked(&what, request.call())?)
    }

    /// `POST path` with a JSON body, the answer's JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        let what = format!("POST {}{path}", self.base);
        let request = self.authorized(self.agent.post(format!("{}{path}", self.base)));
        json(&what, checked(&what, request.send_json(body))?)
    }

    /// `POST path` without a body (the lifecycle actions), the answer's JSON body.
    pub fn post_empty(&self, path: &str) -> Result<Value, CliError> {
        let what = format!("POST {}{path}", self.base);
        let request = self.authorized(self.agent.post(format!("{}{path}", self.base)));
        json(&what, checked(&what, request.send_empty())?)
    }

    /// `POST path` with a CSV body read from `reader` as it is sent, the answer's JSON body.
    pub fn post_csv(&self, path: &str, reader: &mut dyn std::io::Read) -> Result<Value, CliError> {
        let what = format!("POST {}{path}", self.base);
        let request = self
            .authorized(self.agent.post(format!("{}{path}", self.base)))
            .content_type("text/csv");
        json(
            &what,
            checked(&what, request.send(ureq::SendBody::from_reader(reader)))?,
        )
    }

    /// `DELETE path`, answered 2xx.
    pub fn delete(&self, path: &str) -> Result<(), CliError> {
        let what = format!("DELETE {}{path}", self.base);
        let request = self.authorized(self.agent.delete(format!("{}{path}", self.base)));
        checked(&what, request.call()).map(drop)
    }
}

/// The response when it is 2xx; else the API's error.
fn checked(
    what: &str,
    result: Result<Response<Body>, ureq::Error>,
) -> Result<Response<Body>, CliError> {
    let mut response = result.map_err(|e| CliError::Unreachable {
        what: what.to_owned(),
        cause: match e {
            ureq::Error::Io(io) => format!("cannot reach the server: {io}"),
            other => other.to_string(),
        },
    })?;
    let status = response.status().as_u16();
    if (200..300).contains(&status) {
        return Ok(response);
    }
    let text = response
        .body_mut()
        .with_config()
        .limit(64 * 1024)
        .read_to_string()
        .unwrap_or_default();
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let field = |name: &str| {
        body.pointer(&format!("/error/{name}"))
            .and_then(Value::as_str)
    };
    let (code, message) = match (field("code"), field("message")) {
        (Some(code), Some(message)) => (code.to_owned(), message.to_owned()),
        _ => ("http_error".to_owned(), text.chars().take(300).collect()),
    };
    Err(CliError::Api {
        what: what.to_owned(),
        status,
        code,
        message,
        hint: if status == 401 {
            " (set SMSBATCH_TOKEN to the server's admin.token)"
        } else {
            ""
        },
    })
}

/// The JSON body of a 2xx answer (`Null` when empty).
fn json(what: &str, mut response: Response<Body>) -> Result<Value, CliError> {
    let text = response
        .body_mut()
        .with_config()
        .limit(256 * 1024 * 1024)
        .read_to_string()
        .map_err(|e| CliError::Unreachable {
            what: what.to_owned(),
            cause: format!("reading the answer: {e}"),
        })?;
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&text).map_err(|e| CliError::Unreachable {
        what: what.to_owned(),
        cause: format!("the answer is not JSON: {e}"),
    })
}
