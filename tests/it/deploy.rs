//! The deployment files, checked without a Docker engine: `docker-compose.yml` by Compose v2
//! itself and against the files, ports and services it names and the README's tables; the
//! `Dockerfile` against what the built binary needs and what the crate compiles from; the
//! Prometheus configuration and alert rules by `promtool`; the Grafana dashboard's queries by
//! `promtool` too, written out as recording rules, and against its provisioning and the README.
#![allow(clippy::unwrap_used)]

mod dockerfile;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

use crate::common::tools::{docker_compose, prometheus_bin, repo, run, run_ok};

/// What `$__rate_interval` stands for when a dashboard query is checked or run outside Grafana.
pub(crate) const RATE_WINDOW: &str = "5m";

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The YAML document of `path`.
pub(crate) fn yaml(path: &Path) -> Yaml {
    let mut docs = YamlLoader::load_from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
    assert_eq!(docs.len(), 1, "{} holds one document", path.display());
    docs.remove(0)
}

/// A YAML sequence's items (none when it is absent).
fn items(y: &Yaml) -> &[Yaml] {
    y.as_vec().map(Vec::as_slice).unwrap_or_default()
}

/// One query of a dashboard panel.
pub(crate) struct Query {
    /// The panel's title.
    pub panel: String,
    /// The query as Grafana runs it (`$__rate_interval` included).
    pub expr: String,
}

impl Query {
    /// The query as Prometheus can run it: Grafana's rate window replaced by [`RATE_WINDOW`].
    pub fn promql(&self) -> String {
        self.expr.replace("$__rate_interval", RATE_WINDOW)
    }
}

/// The dashboard JSON.
fn dashboard() -> Value {
    let path = repo().join("deploy/grafana/dashboards/smsbatch.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every query of every panel of the dashboard, in order.
pub(crate) fn dashboard_queries() -> Vec<Query> {
    let mut queries = Vec::new();
    for panel in dashboard()["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(Query {
                panel: panel["title"].as_str().unwrap().to_owned(),
                expr: target["expr"].as_str().unwrap().to_owned(),
            });
        }
    }
    queries
}

/// Every alert rule of `deploy/prometheus/alerts.yml`: (name, expression).
pub(crate) fn alert_rules() -> Vec<(String, String)> {
    let rules = yaml(&repo().join("deploy/prometheus/alerts.yml"));
    let mut alerts = Vec::new();
    for group in items(&rules["groups"]) {
        for rule in items(&group["rules"]) {
            let name = rule["alert"].as_str().expect("an alert rule");
            alerts.push((name.to_owned(), rule["expr"].as_str().unwrap().to_owned()));
        }
    }
    alerts
}

/// The text with every run of white space made one space.
fn squeeze(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The README's section that starts with `heading` (up to the next heading of its level or
/// above).
fn readme_section(heading: &str) -> String {
    let readme = read(&repo().join("README.md"));
    let start = readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README.md has a section {heading:?}"));
    let level = heading.split(' ').next().unwrap();
    let rest = &readme[start + heading.len() + 2..];
    let end = rest
        .match_indices('\n')
        .map(|(i, _)| i + 1)
        .find(|&i| {
            let line = &rest[i..];
            let hashes = line.len() - line.trim_start_matches('#').len();
            hashes > 0 && hashes <= level.len() && line[hashes..].starts_with(' ')
        })
        .unwrap_or(rest.len());
    rest[..end].to_owned()
}

/// The rows of the README tables in `section` whose first cell is a code span: its text, and
/// the other cells.
fn table_rows(section: &str) -> Vec<(String, Vec<String>)> {
    section
        .lines()
        .filter_map(|line| {
            let cells: Vec<String> = line
                .strip_prefix('|')?
                .strip_suffix('|')?
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect();
            let key = cells[0].strip_prefix('`')?.strip_suffix('`')?.to_owned();
            Some((key, cells[1..].to_vec()))
        })
        .collect()
}

/// `docker compose config --format json` of the repository's compose file.
fn compose_config() -> Value {
    let json = run_ok(docker_compose(), &["config", "--format", "json"], &repo());
    serde_json::from_str(&json).unwrap()
}

/// A compose service's container ports: the targets of its `ports` and its `expose`.
fn container_ports(service: &Value) -> BTreeSet<u16> {
    let published = service["ports"].as_array().into_iter().flatten();
    let exposed = service["expose"].as_array().into_iter().flatten();
    published
        .map(|p| p["target"].as_u64().unwrap().to_string())
        .chain(exposed.map(|e| e.as_str().unwrap().to_owned()))
        .map(|p| p.parse().unwrap())
        .collect()
}

/// A service's bind mounts: (host path, container path).
fn binds(service: &Value) -> Vec<(PathBuf, String)> {
    service["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "bind")
        .map(|v| {
            let source = PathBuf::from(v["source"].as_str().unwrap());
            (source, v["target"].as_str().unwrap().to_owned())
        })
        .collect()
}

/// The host path that a service sees at `container_path` through its bind mounts.
fn host_path(service: &Value, container_path: &str) -> Option<PathBuf> {
    binds(service).into_iter().find_map(|(source, target)| {
        let rest = container_path.strip_prefix(&target)?;
        if rest.is_empty() {
            Some(source)
        } else {
            Some(source.join(rest.strip_prefix('/')?))
        }
    })
}

/// Checks that `host:port` names a service of the stack and one of its container ports.
fn assert_in_stack(services: &serde_json::Map<String, Value>, address: &str, what: &str) {
    let (host, port) = address.rsplit_once(':').unwrap();
    let service = services
        .get(host)
        .unwrap_or_else(|| panic!("{what} {address}: no service {host} in docker-compose.yml"));
    assert!(
        container_ports(service).contains(&port.parse().unwrap()),
        "{what} {address}: {host} neither publishes nor exposes port {port}"
    );
}

/// Compose v2 accepts the file; every service has a health check; the files it mounts exist
/// and are where the README says; the ports are the README's; and the addresses the
/// monitoring configuration uses name services, ports and paths of the stack.
#[test]
fn the_compose_file_holds_together() {
    run_ok(docker_compose(), &["config", "-q"], &repo());
    let config = compose_config();
    let services = config["services"].as_object().unwrap();
    let repo = repo();

    for (name, service) in services {
        let check = &service["healthcheck"];
        let test = check["test"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        assert!(
            !test.is_empty() && test[0] != "NONE" && check["disable"] != true,
            "service {name} has no health check: {check}"
        );
    }

    // The README's table of services: ports on the host and addresses inside the network.
    let section = readme_section("### Docker Compose");
    let port = Regex::new(r"localhost:(\d+)").unwrap();
    let address = Regex::new(r"`([a-z0-9-]+:\d+)`").unwrap();
    let mut documented = BTreeMap::new();
    for (name, cells) in table_rows(&section) {
        if name.starts_with("deploy/") {
            continue; // the table of files
        }
        let host: BTreeSet<String> = port
            .captures_iter(&cells[0])
            .map(|c| c[1].to_owned())
            .collect();
        for inside in address.captures_iter(&cells[1]) {
            assert!(
                inside[1].starts_with(&format!("{name}:")),
                "README: {name}: {inside:?}"
            );
            assert_in_stack(services, &inside[1], "README's address");
        }
        documented.insert(name, host);
    }
    let published: BTreeMap<String, BTreeSet<String>> = services
        .iter()
        .map(|(name, service)| {
            let ports = service["ports"].as_array().into_iter().flatten();
            let ports = ports.map(|p| p["published"].as_str().unwrap().to_owned());
            (name.clone(), ports.collect())
        })
        .collect();
    assert_eq!(
        documented, published,
        "README's host ports against docker-compose.yml"
    );

    // Every bind mount: it exists, and the README's table of files lists it.
    let mut mounted = BTreeSet::new();
    for (name, service) in services {
        for (source, target) in binds(service) {
            assert!(
                source.exists(),
                "{name} mounts {}, which does not exist",
                source.display()
            );
            let relative = source.strip_prefix(&repo).unwrap_or_else(|_| {
                panic!(
                    "{name} mounts {} from outside the repository",
                    source.display()
                )
            });
            mounted.insert((
                relative.display().to_string(),
                format!("`{target}` in `{name}`"),
            ));
        }
    }
    let files: BTreeSet<(String, String)> = table_rows(&section)
        .into_iter()
        .filter(|(key, _)| key.starts_with("deploy/"))
        .map(|(key, cells)| (key, cells[0].clone()))
        .collect();
    assert_eq!(
        files, mounted,
        "README's mounted files against docker-compose.yml"
    );

    // Prometheus: its configuration is mounted where its command reads it, its rule files are
    // next to it, and its targets are services and ports of the stack.
    let prometheus = &services["prometheus"];
    let config_file = prometheus["command"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str()?.strip_prefix("--config.file="))
        .expect("prometheus's command names its --config.file");
    let config_file = host_path(prometheus, config_file).expect("the config file is mounted");
    let prometheus_yml = yaml(&config_file);
    for rule_file in items(&prometheus_yml["rule_files"]) {
        let path = config_file.with_file_name(rule_file.as_str().unwrap());
        assert!(path.exists(), "rule file {} is missing", path.display());
    }
    for job in items(&prometheus_yml["scrape_configs"]) {
        for static_config in items(&job["static_configs"]) {
            for target in items(&static_config["targets"]) {
                assert_in_stack(services, target.as_str().unwrap(), "Prometheus target");
            }
        }
    }

    // RabbitMQ serves what Prometheus scrapes: its plugin is in the mounted plugin list.
    let plugins = host_path(&services["rabbitmq"], "/etc/rabbitmq/enabled_plugins")
        .expect("rabbitmq's enabled_plugins is mounted");
    assert!(
        read(&plugins).contains("rabbitmq_prometheus"),
        "{}",
        plugins.display()
    );

    // Grafana: its datasource is the stack's Prometheus, its dashboard folder is mounted.
    let grafana = &services["grafana"];
    let provisioning =
        host_path(grafana, "/etc/grafana/provisioning").expect("provisioning is mounted");
    let datasources = yaml(&provisioning.join("datasources/prometheus.yml"));
    let url = datasources["datasources"][0]["url"].as_str().unwrap();
    assert_in_stack(
        services,
        url.trim_start_matches("http://"),
        "Grafana's datasource",
    );
    let providers = yaml(&provisioning.join("dashboards/smsbatch.yml"));
    let folder = providers["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let folder = host_path(grafana, folder).expect("the dashboards' folder is mounted");
    assert!(
        folder.join("smsbatch.json").exists(),
        "{}",
        folder.display()
    );
}

/// `promtool check config` (which checks the rule files it names too) and `promtool check
/// rules` pass on the shipped Prometheus files.
#[test]
fn the_prometheus_files_pass_promtool() {
    let promtool = prometheus_bin().join("promtool");
    let dir = repo().join("deploy/prometheus");
    run_ok(&promtool, &["check", "config", "prometheus.yml"], &dir);
    let out = run_ok(&promtool, &["check", "rules", "alerts.yml"], &dir);
    let alerts = alert_rules().len();
    assert!(
        out.contains(&format!("SUCCESS: {alerts} rules found")),
        "{out}"
    );
}

/// Every query of the dashboard, written out as a recording rule, passes `promtool check
/// rules`; every panel reads the provisioned datasource; the README shows every panel's
/// queries and every alert's expression as they are.
#[test]
fn the_dashboard_queries_pass_promtool_and_match_the_readme() {
    let dashboard = dashboard();
    let datasource = yaml(&repo().join("deploy/grafana/provisioning/datasources/prometheus.yml"));
    let uid = datasource["datasources"][0]["uid"].as_str().unwrap();
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "panel id of {title} repeats"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], uid, "datasource of {title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], uid, "datasource of {title}");
        }
    }

    let queries = dashboard_queries();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, query) in queries.iter().enumerate() {
        let promql = query.promql();
        assert!(
            !promql.contains('$'),
            "{}: a Grafana variable is left: {promql}",
            query.panel
        );
        // A JSON string is a YAML double-quoted scalar.
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            Value::from(promql)
        ));
    }
    let dir = std::env::temp_dir().join(format!("smsbatch-dashboard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dashboard.rules.yml"), &rules).unwrap();
    let promtool = prometheus_bin().join("promtool");
    let out = run(&promtool, &["check", "rules", "dashboard.rules.yml"], &dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "the dashboard's queries do not all parse:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let readme = squeeze(&readme_section("## Monitoring"));
    for query in &queries {
        assert!(
            readme.contains(&format!("*{}*", query.panel)),
            "README: panel {}",
            query.panel
        );
        assert!(
            readme.contains(&squeeze(&query.expr)),
            "README: query {}",
            query.expr
        );
    }
    for (name, expr) in alert_rules() {
        assert!(
            readme.contains(&format!("**`{name}`**")),
            "README: alert {name}"
        );
        assert!(
            readme.contains(&squeeze(&expr)),
            "README: {name}'s expression {expr}"
        );
    }
}
