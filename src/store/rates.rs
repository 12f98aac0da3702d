//! Rate windows: what every instance took of an account's rate limit in each window of
//! wall-clock time (`provider::rate`), counted in one row per account and window.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::rate_windows;
use super::{Store, StoreError, with_conn};

impl Store {
    /// Adds `want` to what `account` took in the window starting at `start_ms` and returns the
    /// window's total, this take included: the takes of the window before it are the total less
    /// `want`, whichever instance made them.
    pub async fn take_rate(
        &self,
        account: &str,
        start_ms: i64,
        want: i64,
    ) -> Result<i64, StoreError> {
        with_conn!(self, |conn| {
            Ok(diesel::insert_into(rate_windows::table)
                .values((
                    rate_windows::account.eq(account),
                    rate_windows::start_ms.eq(start_ms),
                    rate_windows::used.eq(want),
                ))
                .on_conflict((rate_windows::account, rate_windows::start_ms))
                .do_update()
                .set(rate_windows::used.eq(rate_windows::used + want))
                .returning(rate_windows::used)
                .get_result(conn)
                .await?)
        })
    }

    /// Deletes `account`'s windows that started before `before_ms`.
    pub async fn forget_rate_windows(
        &self,
        account: &str,
        before_ms: i64,
    ) -> Result<usize, StoreError> {
        with_conn!(self, |conn| {
            Ok(diesel::delete(
                rate_windows::table
                    .filter(rate_windows::account.eq(account))
                    .filter(rate_windows::start_ms.lt(before_ms)),
            )
            .execute(conn)
            .await?)
        })
    }
}
