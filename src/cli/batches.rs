//! `smsbatch send` (create, upload with a progress bar, start, and follow if asked) and
//! `smsbatch batches list|show|start|pause|resume|cancel|retry`.

use std::fs::File;
use std::io::{IsTerminal, Read};
use std::path::Path;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use super::client::{CliError, Client};
use super::follow::{count, ended, follow, progress_line, text};
use super::{BatchesCommand, Output, SendArgs};

/// `smsbatch send FILE.csv --content TEXT [--name N] [--provider P] [--follow]`.
pub fn send(client: &Client, output: Output, args: &SendArgs) -> Result<u8, CliError> {
    let file = open(&args.file)?;
    let name = match &args.name {
        Some(name) => name.clone(),
        None => args
            .file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "batch".to_owned()),
    };
    let mut create = json!({"name": name, "content": args.content});
    if let Some(provider) = &args.provider {
        create["provider"] = json!(provider);
    }
    let created = client.post("/v1/batches", &create)?;
    let id = text(&created, "/id").to_owned();
    let uploaded = upload(client, &format!("/v1/batches/{id}/recipients"), file);
    let uploaded = match uploaded {
        Ok(answer) => answer,
        Err(e) => {
            // A batch whose recipients were refused is of no use: cancel it rather than leave
            // it waiting in `initial`.
            let cancelled = client
                .post_empty(&format!("/v1/batches/{id}/cancel"))
                .is_ok();
            let fate = if cancelled {
                "was cancelled"
            } else {
                "is left in state initial"
            };
            return Err(CliError::Io(format!("{e}\nbatch {id} {fate}")));
        }
    };
    let started = client.post_empty(&format!("/v1/batches/{id}/start"))?;
    // With `--follow --output json`, stdout gets one document: the batch as it ended.
    if output == Output::Text || !args.follow {
        let accepted = count(&uploaded, "/accepted");
        match output {
            Output::Json => println!("{started}"),
            Output::Text => println!(
                "batch {id} ({name}): {accepted} recipients uploaded, {}",
                text(&started, "/state")
            ),
        }
    }
    if !args.follow {
        return Ok(0);
    }
    let batch = follow(client, &id)?;
    Ok(ended(output, &id, &batch))
}

/// Opens a file to read, with its name in the error.
pub fn open(path: &Path) -> Result<File, CliError> {
    File::open(path).map_err(|e| CliError::Io(format!("cannot read {}: {e}", path.display())))
}

/// Posts a CSV file to `path`, with a progress bar of the bytes sent when stderr is a terminal.
pub fn upload(client: &Client, path: &str, file: File) -> Result<Value, CliError> {
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    if !std::io::stderr().is_terminal() {
        let mut reader = file;
        return client.post_csv(path, &mut reader);
    }
    let bar = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>10} [{bar:40.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix("uploading");
    let mut reader: Box<dyn Read> = Box::new(bar.wrap_read(file));
    let answer = client.post_csv(path, &mut reader);
    bar.finish_and_clear();
    answer
}

/// `smsbatch batches …`.
pub fn batches(client: &Client, output: Output, command: BatchesCommand) -> Result<u8, CliError> {
    let (id, action) = match command {
        BatchesCommand::List {
            state,
            limit,
            after,
        } => return list(client, output, state, limit, after),
        BatchesCommand::Show { id } => {
            let batch = client.get(&format!("/v1/batches/{id}"))?;
            match output {
                Output::Json => println!("{batch}"),
                Output::Text => print!("{}", describe(&batch)),
            }
            return Ok(0);
        }
        BatchesCommand::Start { id } => (id, "start"),
        BatchesCommand::Pause { id } => (id, "pause"),
        BatchesCommand::Resume { id } => (id, "resume"),
        BatchesCommand::Cancel { id } => (id, "cancel"),
        BatchesCommand::Retry { id } => (id, "retry"),
    };
    let batch = client.post_empty(&format!("/v1/batches/{id}/{action}"))?;
    match output {
        Output::Json => println!("{batch}"),
        Output::Text => println!("batch {id}: {}", text(&batch, "/state")),
    }
    Ok(0)
}

fn list(
    client: &Client,
    output: Output,
    state: Option<String>,
    limit: u32,
    after: Option<String>,
) -> Result<u8, CliError> {
    let mut path = format!("/v1/batches?limit={limit}");
    if let Some(state) = state {
        path.push_str(&format!("&state={}", encode(&state)));
    }
    if let Some(after) = after {
        path.push_str(&format!("&after={}", encode(&after)));
    }
    let page = client.get(&path)?;
    if output == Output::Json {
        println!("{page}");
        return Ok(0);
    }
    let items = page["items"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    println!(
        "{:<36}  {:<10}  {:>9}  {:>9}  {:>9}  {:>9}  NAME",
        "ID", "STATE", "VALID", "SENT", "DELIVERED", "FAILED"
    );
    for b in items {
        println!(
            "{:<36}  {:<10}  {:>9}  {:>9}  {:>9}  {:>9}  {}",
            text(b, "/id"),
            text(b, "/state"),
            count(b, "/results/valid"),
            count(b, "/results/sent"),
            count(b, "/results/delivered"),
            count(b, "/results/failed"),
            text(b, "/name")
        );
    }
    if let Some(next) = page["next"].as_str() {
        eprintln!("more: smsbatch batches list --after {next}");
    }
    Ok(0)
}

/// A batch for people, a field a line.
fn describe(b: &Value) -> String {
    let mut out = String::new();
    let mut line = |key: &str, value: String| {
        if !value.is_empty() {
            out.push_str(&format!("{key:<12} {value}\n"));
        }
    };
    line("id", text(b, "/id").to_owned());
    line("name", text(b, "/name").to_owned());
    line("state", progress_line(b));
    line("content", text(b, "/content").to_owned());
    line(
        "provider",
        format!(
            "{}, {}, {} partitions",
            text(b, "/provider"),
            text(b, "/message_type"),
            count(b, "/partition_count")
        ),
    );
    line("resent from", text(b, "/parent_id").to_owned());
    for step in ["preparation", "delivery"] {
        let p = |f: &str| count(b, &format!("/steps/{step}/progress/{f}"));
        line(
            step,
            format!(
                "{} {}/{}",
                text(b, &format!("/steps/{step}/status")),
                p("processed"),
                p("total")
            ),
        );
    }
    let r = |f: &str| count(b, &format!("/results/{f}"));
    line(
        "recipients",
        format!(
            "{} ({} valid, {} invalid, {} duplicates, {} opted out)",
            r("recipients"),
            r("valid"),
            r("invalid"),
            r("duplicates"),
            r("opted_out")
        ),
    );
    line("error", text(b, "/error").to_owned());
    line("created", text(b, "/created_at").to_owned());
    line("finished", text(b, "/finished_at").to_owned());
    out
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
