//! The many-batches mode's API client: one per thread (its own connections), spreading its calls
//! round-robin over the instances through a counter shared by all clients, and timing each call.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// The states a batch can still leave, in the order a batch passes through them (a scan in this
/// order cannot miss a batch that moves on during the scan). `initial` is left out: every batch
/// the benchmark waits for has been started.
pub(crate) const NON_FINAL: [&str; 4] = ["scheduled", "preparing", "delivering", "paused"];

pub(crate) struct Api {
    bases: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    agent: ureq::Agent,
    /// Latency of every call made, in milliseconds.
    pub(crate) latencies_ms: Vec<f64>,
    /// Calls that failed (transport error or an unexpected status).
    pub(crate) errors: usize,
}

impl Api {
    pub(crate) fn new(bases: Vec<String>) -> Self {
        Api::with(Arc::new(bases), Arc::new(AtomicUsize::new(0)))
    }

    fn with(bases: Arc<Vec<String>>, next: Arc<AtomicUsize>) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .new_agent();
        Api {
            bases,
            next,
            agent,
            latencies_ms: Vec::new(),
            errors: 0,
        }
    }

    /// Another client on the same instances and round-robin counter, with its own connections
    /// and its own (empty) latencies.
    pub(crate) fn fork(&self) -> Self {
        Api::with(self.bases.clone(), self.next.clone())
    }

    fn base(&self) -> &str {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.bases.len();
        &self.bases[i]
    }

    /// One call; `expect` is the status that counts as success. Errors are counted and the
    /// first few are written to stderr.
    fn call(&mut self, method: &str, path: &str, body: Option<&Value>, expect: u16) -> Result {
        let url = format!("{}{path}", self.base());
        let t = Instant::now();
        let answer = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            (_, Some(body)) => self.agent.post(&url).send_json(body),
            (_, None) => self.agent.post(&url).send_empty(),
        };
        let outcome = answer.map_err(anyhow::Error::from).and_then(|mut a| {
            let status = a.status().as_u16();
            let text = a.body_mut().read_to_string()?;
            if status != expect {
                bail!("{method} {path} answered {status}: {text}");
            }
            Ok(serde_json::from_str(&text)?)
        });
        self.latencies_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if let Err(e) = &outcome {
            self.errors += 1;
            if self.errors <= 3 {
                eprintln!("api error: {e:#}");
            }
        }
        outcome
    }

    /// Creates a batch; its id.
    pub(crate) fn create(&mut self, body: &Value) -> anyhow::Result<String> {
        let created = self.call("POST", "/v1/batches", Some(body), 201)?;
        Ok(created["id"].as_str().context("batch id")?.to_string())
    }

    /// Uploads a CSV file as the batch's recipients.
    pub(crate) fn upload(&mut self, id: &str, csv: &std::path::Path) -> anyhow::Result<()> {
        let url = format!("{}/v1/batches/{id}/recipients", self.base());
        let answer = self
            .agent
            .post(&url)
            .config()
            .timeout_global(Some(Duration::from_secs(3600)))
            .build()
            .header("Content-Type", "text/csv")
            .send(std::fs::File::open(csv)?)?;
        if answer.status() != 200 {
            bail!("upload answered {}", answer.status());
        }
        Ok(())
    }

    /// `start`, `pause`, …: the batch as the action left it.
    pub(crate) fn action(&mut self, id: &str, action: &str) -> Result {
        self.call("POST", &format!("/v1/batches/{id}/{action}"), None, 202)
    }

    pub(crate) fn get(&mut self, id: &str) -> Result {
        self.call("GET", &format!("/v1/batches/{id}"), None, 200)
    }

    /// One page of `GET /v1/batches`: its items and the cursor of the next page.
    pub(crate) fn page(
        &mut self,
        state: Option<&str>,
        limit: usize,
        after: Option<&str>,
    ) -> anyhow::Result<(Vec<Value>, Option<String>)> {
        let mut path = format!("/v1/batches?limit={limit}");
        if let Some(state) = state {
            path.push_str(&format!("&state={state}"));
        }
        if let Some(after) = after {
            path.push_str(&format!("&after={after}"));
        }
        let mut page = self.call("GET", &path, None, 200)?;
        let items = match page["items"].take() {
            Value::Array(items) => items,
            _ => bail!("list answer without items"),
        };
        let next = page["next"].as_str().map(str::to_string);
        Ok((items, next))
    }

    /// Every batch (in `state`, if given), paging by 500.
    pub(crate) fn list_all(&mut self, state: Option<&str>) -> anyhow::Result<Vec<Value>> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let (items, next) = self.page(state, 500, after.as_deref())?;
            all.extend(items);
            match next {
                Some(n) => after = Some(n),
                None => return Ok(all),
            }
        }
    }

    /// Whether any batch is in a non-final state (one `limit=1` call per state).
    pub(crate) fn any_non_final(&mut self) -> anyhow::Result<bool> {
        for state in NON_FINAL {
            if !self.page(Some(state), 1, None)?.0.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The ids of every batch in a non-final state.
    pub(crate) fn non_final_ids(&mut self) -> anyhow::Result<std::collections::HashSet<String>> {
        let mut ids = std::collections::HashSet::new();
        for state in NON_FINAL {
            for b in self.list_all(Some(state))? {
                if let Some(id) = b["id"].as_str() {
                    ids.insert(id.to_string());
                }
            }
        }
        Ok(ids)
    }
}

type Result = anyhow::Result<Value>;
