//! How the domain's typed values are read from their columns: states, step statuses and message
//! types by their names (`TEXT`), message statuses by their numbers (`SMALLINT`, the mapping of
//! `MessageStatus::as_i16`), a batch's steps and conditions as JSON (`TEXT`). A stored value that
//! does not parse is an error, which the store reports as `StoreError::Corrupt`, never a default.
//!
//! Writes go through the same mappings (`as_str`, `as_i16`, `serde_json`), so every name and
//! number lives once, in `domain`.

use diesel::backend::Backend;
use diesel::deserialize::{self, FromSql, Queryable};
use diesel::sql_types::{SmallInt, SqlType, Text};
use serde::de::DeserializeOwned;

use crate::domain::batch::{MessageStatus, MessageType};
use crate::domain::lifecycle::{Conditions, Steps};
use crate::domain::state::BatchState;

/// The status numbers as the SQL this module's neighbours write by hand uses them.
pub(super) const PENDING: i16 = MessageStatus::Pending.as_i16();
pub(super) const SENDING: i16 = MessageStatus::Sending.as_i16();
pub(super) const SENT: i16 = MessageStatus::Sent.as_i16();
pub(super) const DELIVERED: i16 = MessageStatus::Delivered.as_i16();
pub(super) const FAILED: i16 = MessageStatus::Failed.as_i16();
pub(super) const CANCELLED: i16 = MessageStatus::Cancelled.as_i16();

/// A column's value read as `Self`, as diesel's derive of `FromSqlRow` would have it.
macro_rules! queryable_as_value {
    ($sql:ty => $($ty:ty),+) => {$(
        impl<DB: Backend> Queryable<$sql, DB> for $ty
        where
            Self: FromSql<$sql, DB>,
        {
            type Row = Self;

            fn build(row: Self) -> deserialize::Result<Self> {
                Ok(row)
            }
        }
    )+};
}

/// Values stored by their names.
macro_rules! stored_by_name {
    ($($ty:ty),+) => {$(
        impl<DB: Backend> FromSql<Text, DB> for $ty
        where
            String: FromSql<Text, DB>,
        {
            fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
                let name = String::from_sql(bytes)?;
                name.parse()
                    .map_err(|e| format!("{}: {e}", stringify!($ty)).into())
            }
        }
        queryable_as_value!(Text => $ty);
    )+};
}

stored_by_name!(BatchState, MessageType);

impl<DB: Backend> FromSql<SmallInt, DB> for MessageStatus
where
    i16: FromSql<SmallInt, DB>,
{
    fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
        let code = i16::from_sql(bytes)?;
        MessageStatus::from_i16(code).ok_or_else(|| format!("message status {code}").into())
    }
}
queryable_as_value!(SmallInt => MessageStatus);

/// Reads a JSON document of a `TEXT` column.
fn from_json<T: DeserializeOwned, ST: SqlType, DB: Backend>(
    bytes: DB::RawValue<'_>,
    what: &str,
) -> deserialize::Result<T>
where
    String: FromSql<ST, DB>,
{
    let text = String::from_sql(bytes)?;
    serde_json::from_str(&text).map_err(|e| format!("{what}: {e}").into())
}

impl<DB: Backend> FromSql<Text, DB> for Steps
where
    String: FromSql<Text, DB>,
{
    fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
        from_json::<_, Text, DB>(bytes, "steps")
    }
}

impl<DB: Backend> FromSql<Text, DB> for Conditions
where
    String: FromSql<Text, DB>,
{
    fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
        from_json::<_, Text, DB>(bytes, "conditions")
    }
}
queryable_as_value!(Text => Steps, Conditions);

/// The JSON of a batch's steps or conditions, as stored. These documents are plain structs and
/// lists of them, which always serialise.
pub(crate) fn to_json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
