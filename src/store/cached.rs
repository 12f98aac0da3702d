//! Statements prepared once per connection. diesel marks every `UPDATE` and every `sql_query` as
//! unsafe to cache (their text may depend on their values), so the server parsed and planned
//! each of them at every run, delivery's claim and record of every slice included (the cost is in
//! BENCHMARKS.md, "Figures behind the code's comments"). `Cached` is for statements whose text is
//! fixed whatever their values: the connection's statement cache keys them by their text, and
//! reuses the prepared statement.

use diesel::QueryResult;
use diesel::backend::Backend;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};

/// A statement of a fixed text, prepared once per connection (see the module's documentation).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cached<Q>(pub Q);

impl<Q> QueryId for Cached<Q> {
    type QueryId = ();
    // Keyed by its text, not by its type: the type of a `sql_query` is the same for every SQL.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: Query> Query for Cached<Q> {
    type SqlType = Q::SqlType;
}

impl<DB: Backend, Q: QueryFragment<DB>> QueryFragment<DB> for Cached<Q> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &DB) -> QueryResult<bool> {
        Ok(true)
    }
}
