//! What moves lists in and out: `smsbatch messages` (a batch's messages to stdout, streamed as
//! the server sends them) and `smsbatch opt-outs add|remove|import|export`.

use std::io::{self, BufWriter, Read, Write};

use serde_json::{Value, json};

use super::batches::{encode, open, upload};
use super::client::{CliError, Client};
use super::follow::count;
use super::{OptOutsCommand, Output};

/// Page size when reading a listing page by page.
const PAGE: u32 = 1000;

/// Runs `write` on a buffered stdout and flushes it; a reader that went away (`| head`) ends
/// the command quietly.
fn to_stdout(write: impl FnOnce(&mut dyn Write) -> Result<(), CliError>) -> Result<u8, CliError> {
    let stdout = io::stdout();
    let mut out = BufWriter::with_capacity(64 * 1024, stdout.lock());
    match write(&mut out).and_then(|()| out.flush().map_err(write_failed)) {
        Ok(()) | Err(CliError::Closed) => Ok(0),
        Err(e) => Err(e),
    }
}

/// A failed write to stdout.
fn write_failed(e: io::Error) -> CliError {
    match e.kind() {
        io::ErrorKind::BrokenPipe => CliError::Closed,
        _ => CliError::Io(format!("writing stdout: {e}")),
    }
}

/// Calls `each` for every item of a listing, reading it page by page after `next`.
fn for_each_item(
    client: &Client,
    base: &str,
    mut each: impl FnMut(&Value) -> Result<(), CliError>,
) -> Result<(), CliError> {
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(cursor) => format!("{base}&after={}", encode(cursor)),
            None => base.to_owned(),
        };
        let page = client.get(&path)?;
        for item in page["items"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            each(item)?;
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return Ok(()),
        }
    }
}

/// `smsbatch messages ID [--status S]`: the server's CSV export copied to stdout as it arrives;
/// with `--output json`, the messages as JSON lines, read a page at a time.
pub fn messages(
    client: &Client,
    output: Output,
    id: &str,
    status: Option<&str>,
) -> Result<u8, CliError> {
    let filter = status
        .map(|s| format!("status={}", encode(s)))
        .unwrap_or_default();
    if output == Output::Json {
        let base = format!("/v1/batches/{id}/messages?limit={PAGE}&{filter}");
        return json_lines(client, &base);
    }
    let path = format!("/v1/batches/{id}/messages?{filter}");
    let mut response = client.get_stream(&path, "text/csv")?;
    let mut body = response.body_mut().as_reader();
    to_stdout(|out| {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = body.read(&mut buf).map_err(|e| CliError::Unreachable {
                what: format!("GET {path}"),
                cause: format!("the export was cut short: {e}"),
            })?;
            if n == 0 {
                return Ok(());
            }
            out.write_all(&buf[..n]).map_err(write_failed)?;
        }
    })
}

/// Every item of a listing, one JSON document a line.
fn json_lines(client: &Client, base: &str) -> Result<u8, CliError> {
    to_stdout(|out| {
        for_each_item(client, base, |item| {
            writeln!(out, "{item}").map_err(write_failed)
        })
    })
}

/// `smsbatch opt-outs …`.
pub fn opt_outs(client: &Client, output: Output, command: OptOutsCommand) -> Result<u8, CliError> {
    match command {
        OptOutsCommand::Add { phones } => {
            let added = client.post("/v1/opt-outs", &json!({"phones": phones}))?;
            print_added(output, &added);
            Ok(0)
        }
        OptOutsCommand::Import { file } => {
            let added = upload(client, "/v1/opt-outs", open(&file)?)?;
            print_added(output, &added);
            Ok(0)
        }
        OptOutsCommand::Remove { phones } => {
            // Each number on its own: one that is not listed does not stop the others.
            let mut failed = None;
            for phone in &phones {
                match client.delete(&format!("/v1/opt-outs/{}", encode(phone))) {
                    Ok(()) => match output {
                        Output::Json => println!("{}", json!({"phone": phone, "removed": true})),
                        Output::Text => println!("{phone}: removed"),
                    },
                    Err(e) => {
                        eprintln!("smsbatch: {e}");
                        failed = Some(e);
                    }
                }
            }
            match failed {
                Some(_) => Ok(super::EXIT_ERROR),
                None => Ok(0),
            }
        }
        OptOutsCommand::Export => {
            let base = format!("/v1/opt-outs?limit={PAGE}");
            if output == Output::Json {
                return json_lines(client, &base);
            }
            export_opt_outs(client, &base)
        }
    }
}

/// The list as CSV, `phone,source,created_at`, page by page.
fn export_opt_outs(client: &Client, base: &str) -> Result<u8, CliError> {
    to_stdout(|out| {
        writeln!(out, "phone,source,created_at").map_err(write_failed)?;
        for_each_item(client, base, |item| {
            let field = |name: &str| item[name].as_str().unwrap_or("").to_owned();
            // Numbers, sources and times hold no comma, quote or line break.
            writeln!(
                out,
                "{},{},{}",
                field("phone"),
                field("source"),
                field("created_at")
            )
            .map_err(write_failed)
        })
    })
}

fn print_added(output: Output, added: &Value) {
    match output {
        Output::Json => println!("{added}"),
        Output::Text => println!(
            "{} added, {} already listed, {} not phone numbers",
            count(added, "/added"),
            count(added, "/already"),
            count(added, "/invalid")
        ),
    }
}
