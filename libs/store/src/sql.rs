//! SQL built at run time that runs on both engines.
//!
//! `sqlx::QueryBuilder::<Any>::push_bind` writes `?`, which Postgres refuses; `$1, $2…`
//! works on both (SQLite reads `$NNN` as the NNN-th parameter). [`Sql`] numbers the
//! placeholders as it binds.

use std::fmt::Write as _;

use sqlx::any::{Any, AnyArguments};
use sqlx::query::Query;
use sqlx::{Arguments, Encode, Type};

/// A query under construction: text plus arguments, placeholders numbered `$1…`.
#[derive(Default)]
pub struct Sql {
    text: String,
    args: AnyArguments,
    count: usize,
}

impl std::fmt::Debug for Sql {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The arguments may be secrets (hashes, keys): only the text is shown.
        f.debug_struct("Sql").field("text", &self.text).finish()
    }
}

impl Sql {
    pub fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            ..Self::default()
        }
    }

    /// Appends SQL text as is (never a value: values go through [`Sql::bind`]).
    pub fn push(&mut self, text: impl AsRef<str>) -> &mut Self {
        self.text.push_str(text.as_ref());
        self
    }

    /// Appends the next placeholder and binds `value` to it.
    pub fn bind<'q, T>(&mut self, value: T) -> &mut Self
    where
        T: Encode<'q, Any> + Type<Any> + 'q,
    {
        self.count += 1;
        let _ = write!(self.text, "${}", self.count);
        // Encoding into Any's buffer only copies the value: it cannot fail for the
        // types Any supports, and a type it does not support does not compile.
        self.args
            .add(value)
            .expect("a value of a type Any supports encodes");
        self
    }

    /// Binds each value, the placeholders separated by commas (for `IN (…)`).
    pub fn bind_list<'q, T, I>(&mut self, values: I) -> &mut Self
    where
        I: IntoIterator<Item = T>,
        T: Encode<'q, Any> + Type<Any> + 'q,
    {
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self.text.push_str(", ");
            }
            self.bind(value);
        }
        self
    }

    /// Appends `VALUES (…), (…)`, one tuple per item, its values bound by `row`.
    pub fn push_values<I, F>(&mut self, items: I, mut row: F) -> &mut Self
    where
        I: IntoIterator,
        F: FnMut(Tuple<'_>, I::Item),
    {
        self.text.push_str("VALUES ");
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                self.text.push_str(", ");
            }
            self.text.push('(');
            row(
                Tuple {
                    sql: self,
                    first: true,
                },
                item,
            );
            self.text.push(')');
        }
        self
    }

    /// The text so far, for tests and logs.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The query, ready to run.
    pub fn build(self) -> Query<'static, Any, AnyArguments> {
        sqlx::query_with(sqlx::AssertSqlSafe(self.text), self.args)
    }
}

/// One row of [`Sql::push_values`].
#[derive(Debug)]
pub struct Tuple<'a> {
    sql: &'a mut Sql,
    first: bool,
}

impl Tuple<'_> {
    /// Binds the row's next value.
    pub fn bind<'q, T>(&mut self, value: T) -> &mut Self
    where
        T: Encode<'q, Any> + Type<Any> + 'q,
    {
        if !self.first {
            self.sql.text.push_str(", ");
        }
        self.first = false;
        self.sql.bind(value);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered() {
        let mut q = Sql::new("SELECT * FROM t WHERE a = ");
        q.bind(1_i64)
            .push(" AND b = ")
            .bind("x")
            .push(" AND c = ")
            .bind(None::<i64>);
        assert_eq!(
            q.text(),
            "SELECT * FROM t WHERE a = $1 AND b = $2 AND c = $3"
        );
        q.push(" AND d IN (").bind_list([4_i64, 5]).push(")");
        assert!(q.text().ends_with("d IN ($4, $5)"), "{}", q.text());
        let mut q = Sql::new("INSERT INTO t (a, b) ");
        q.push_values([(1_i64, "x"), (2, "y")], |mut row, (a, b)| {
            row.bind(a).bind(b);
        });
        assert_eq!(q.text(), "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4)");
    }
}
