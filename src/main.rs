//! The `smsbatch` binary: `serve` (the default) runs migrations and serves; `migrate` only runs
//! migrations; the other sub-commands are the command-line client (`smsbatch::cli`), which talks
//! to a running server and reads no configuration.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use smsbatch::config::Settings;

/// How long the exit may wait for the last spans to be exported.
const TRACES_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(name = "smsbatch", version, about = "SMS batch orchestrator")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run migrations, then serve the admin API and deliver batches (the default).
    Serve,
    /// Run migrations and exit.
    Migrate,
    #[command(flatten)]
    Client(smsbatch::cli::Command),
}

fn main() -> ExitCode {
    smsbatch::memory::tune_allocator();
    let cli = Cli::parse();
    if let Some(Cmd::Client(command)) = cli.command {
        return smsbatch::cli::run(command);
    }
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("smsbatch: {e}");
            return ExitCode::from(2);
        }
    };
    let traces = match smsbatch::telemetry::init_tracing(&settings.log) {
        Ok(traces) => traces,
        Err(e) => {
            eprintln!("smsbatch: {e}");
            return ExitCode::from(2);
        }
    };
    // Migrations run before the actor system starts: diesel's harness blocks, which the
    // current-thread runtime of the actix System does not allow.
    if let Err(e) = smsbatch::store::migrate(settings.database.url.expose()) {
        eprintln!("smsbatch: {e}");
        return ExitCode::from(1);
    }
    if matches!(cli.command, Some(Cmd::Migrate)) {
        println!("smsbatch: migrations applied");
        traces.shut_down(TRACES_FLUSH);
        return ExitCode::SUCCESS;
    }
    let system = actix::System::new();
    let result = system.block_on(smsbatch::server::serve(settings));
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("smsbatch: {e:#}");
            1
        }
    };
    // The last spans (the stop's own among them) go out before the process ends.
    traces.shut_down(TRACES_FLUSH);
    std::io::stdout().flush().ok();
    std::io::stderr().flush().ok();
    // The process ends here, without dropping the runtime: dropping it would wait for every
    // blocking call still running (a SQLite statement waiting out its busy timeout behind a
    // step that the stop left), past the shutdown timeout. Everything that must outlive the
    // process is committed in the database already.
    std::process::exit(code)
}
