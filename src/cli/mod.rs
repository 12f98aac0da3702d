//! The command-line client: `smsbatch send`, `batches`, `watch`, `messages` and `opt-outs`,
//! beside `serve` and `migrate` in the same binary. It only talks to a running server over the
//! REST API (docs/api.md), so it sits above `http` and names nothing else of the crate: what it
//! knows of the server is what any client knows.
//!
//! The server is `--url`, else `SMSBATCH_URL`, else `http://127.0.0.1:8080`; the token comes
//! from `SMSBATCH_TOKEN` only (never a flag, which would show in the process list). Results go
//! to stdout (`--output json` for scripts), progress to stderr: a bar on a terminal, plain
//! lines otherwise.

mod batches;
mod client;
mod follow;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};

pub use client::{CliError, Client};

/// Exit status: a batch followed to its end ended `failed` or `cancelled`.
pub const EXIT_BATCH_DID_NOT_COMPLETE: u8 = 1;
/// Exit status: the request failed (the server refused it or could not be reached), or a
/// local file could not be read or written. (2 is a command line clap refused.)
pub const EXIT_ERROR: u8 = 3;

/// How results are written to stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people: lines and tables.
    Text,
    /// For scripts: the API's JSON (JSON lines for the listings of messages and opt-outs).
    Json,
}

/// The options every client command takes.
#[derive(Debug, Clone, Args)]
pub struct Options {
    /// The server's base URL [default: $SMSBATCH_URL, else http://127.0.0.1:8080]. The token,
    /// if the server has one, is read from $SMSBATCH_TOKEN.
    #[arg(long, global = true, value_name = "URL")]
    pub url: Option<String>,
    /// `text` for people, `json` for scripts.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// The client's sub-commands (each talks to a running server).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a batch from a CSV file (a `phone` column, every other column a template var),
    /// upload it and start it.
    Send(SendArgs),
    /// List, show, or act on batches.
    Batches {
        /// What to do.
        #[command(subcommand)]
        action: BatchesCommand,
        #[command(flatten)]
        options: Options,
    },
    /// Follow a batch until it ends: exit 0 when it completes, 1 when it fails or is cancelled.
    Watch {
        /// The batch's id.
        id: String,
        #[command(flatten)]
        options: Options,
    },
    /// Write a batch's messages as CSV to stdout (`> file.csv`).
    Messages {
        /// The batch's id.
        id: String,
        /// Only messages with this status (pending, sending, sent, delivered, failed,
        /// cancelled).
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        options: Options,
    },
    /// Manage the opt-out list.
    #[command(name = "opt-outs")]
    OptOuts {
        /// What to do.
        #[command(subcommand)]
        action: OptOutsCommand,
        #[command(flatten)]
        options: Options,
    },
}

/// `smsbatch send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The recipients: a CSV file with a `phone` column.
    pub file: PathBuf,
    /// The message template (`{{column}}` is replaced by the recipient's value).
    #[arg(long)]
    pub content: String,
    /// The batch's name [default: the file's name].
    #[arg(long)]
    pub name: Option<String>,
    /// The provider to send through [default: the server's default provider].
    #[arg(long)]
    pub provider: Option<String>,
    /// Follow the batch until it ends: exit 0 when it completes, 1 when it fails or is
    /// cancelled.
    #[arg(long)]
    pub follow: bool,
    #[command(flatten)]
    pub options: Options,
}

/// `smsbatch batches …`.
#[derive(Debug, Subcommand)]
pub enum BatchesCommand {
    /// List batches, newest first.
    List {
        /// Only batches in this state.
        #[arg(long)]
        state: Option<String>,
        /// At most this many (1–500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Batches older than this one (the `next` of a previous list).
        #[arg(long)]
        after: Option<String>,
    },
    /// Show one batch.
    Show {
        /// The batch's id.
        id: String,
    },
    /// Start a batch that is `initial`.
    Start {
        /// The batch's id.
        id: String,
    },
    /// Pause a batch.
    Pause {
        /// The batch's id.
        id: String,
    },
    /// Resume a paused batch.
    Resume {
        /// The batch's id.
        id: String,
    },
    /// Cancel a batch for good.
    Cancel {
        /// The batch's id.
        id: String,
    },
    /// Retry a failed batch from its last checkpoint.
    Retry {
        /// The batch's id.
        id: String,
    },
}

/// `smsbatch opt-outs …`.
#[derive(Debug, Subcommand)]
pub enum OptOutsCommand {
    /// Add numbers to the list.
    Add {
        /// The numbers, in any form (`+8613800001234`, `138 0000 1234`).
        #[arg(required = true)]
        phones: Vec<String>,
    },
    /// Take numbers off the list.
    Remove {
        /// The numbers, in any form.
        #[arg(required = true)]
        phones: Vec<String>,
    },
    /// Add the numbers of a CSV file's `phone` column.
    Import {
        /// The CSV file.
        file: PathBuf,
    },
    /// Write the whole list as CSV (`phone,source,created_at`) to stdout.
    Export,
}

/// Runs a client command; returns the process's exit status.
pub fn run(command: Command) -> ExitCode {
    let options = match &command {
        Command::Send(args) => &args.options,
        Command::Batches { options, .. }
        | Command::Watch { options, .. }
        | Command::Messages { options, .. }
        | Command::OptOuts { options, .. } => options,
    };
    let client = Client::new(options.url.as_deref());
    let output = options.output;
    let result = match command {
        Command::Send(args) => batches::send(&client, output, &args),
        Command::Batches { action, .. } => batches::batches(&client, output, action),
        Command::Watch { id, .. } => follow::watch(&client, output, &id),
        Command::Messages { id, status, .. } => {
            transfer::messages(&client, output, &id, status.as_deref())
        }
        Command::OptOuts { action, .. } => transfer::opt_outs(&client, output, action),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("smsbatch: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
