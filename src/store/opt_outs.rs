//! Opt-outs: numbers that said stop; preparation drops them.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::records::now;
use super::schema::opt_outs;
use super::{Store, StoreError, with_tx};

impl Store {
    /// Adds numbers to the opt-out list (E.164); returns how many were new.
    pub async fn add_opt_outs(&self, phones: &[String]) -> Result<usize, StoreError> {
        let at = now();
        with_tx!(self, |conn| {
            let mut added = 0;
            for phone in phones {
                added += diesel::insert_into(opt_outs::table)
                    .values((opt_outs::phone.eq(phone), opt_outs::created_at.eq(at)))
                    .on_conflict_do_nothing()
                    .execute(conn)
                    .await?;
            }
            Ok(added)
        })
    }
}
