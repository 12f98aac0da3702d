//! `embed_migrations!` reads the migration folders when the crate compiles, and cargo does not
//! watch them by itself: without this, a migration added alone left a binary without it.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
