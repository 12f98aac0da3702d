//! Micro-run: what normalising a number costs, split into parsing and validation.
//! `cargo run --release --example phone_parse -- 1000000`
use std::time::Instant;

use smsbatch::domain::phone::{E164Phone, Region};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let numbers: Vec<String> = (0..n)
        .map(|i| format!("+86138{:08}", 10_000_000 + i))
        .collect();
    let region: Region = "CN".parse().expect("region");
    let t = Instant::now();
    let mut ok = 0;
    for s in &numbers {
        if phonenumber::parse(None, s).is_ok() {
            ok += 1;
        }
    }
    let per = |t: Instant| t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("crate parse: {:.2} µs/number ({ok} ok)", per(t));
    let t = Instant::now();
    let mut ok = 0;
    for s in &numbers {
        if phonenumber::parse(None, s).is_ok_and(|p| p.is_valid()) {
            ok += 1;
        }
    }
    println!(
        "crate parse + is_valid: {:.2} µs/number ({ok} valid)",
        per(t)
    );
    let t = Instant::now();
    let mut ok = 0;
    for s in &numbers {
        if E164Phone::parse(s, region).is_ok() {
            ok += 1;
        }
    }
    println!("E164Phone::parse: {:.2} µs/number ({ok} valid)", per(t));
}
