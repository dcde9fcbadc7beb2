//! Ids given by a unique prefix, like docker's: wherever a request names a build, a task
//! or a workspace by id, the first characters of the id will do when they match exactly
//! one of the resources the caller may see.
//!
//! The rule, the same in every service (and written in the contract's field comments):
//! - a whole id is looked up as before; so is a workspace name;
//! - otherwise a text of at least [`MIN_PREFIX`] characters made of what ids are made of
//!   (lower-case hex digits and `-`, ids being UUIDs) is a prefix, matched only among the
//!   resources the caller may see, so another user's resources neither match nor make a
//!   prefix ambiguous (existence does not leak);
//! - one match: that resource; none: NOT_FOUND as for an unknown id; several:
//!   INVALID_ARGUMENT with reason `AMBIGUOUS_ID`, a field violation, the candidates in
//!   the message (at most [`SHOWN_CANDIDATES`]) and in ErrorInfo metadata `candidates`;
//! - a shorter prefix: INVALID_ARGUMENT with reason `ID_PREFIX_TOO_SHORT`, since a
//!   one- or two-character prefix would match by luck today and something else tomorrow.

use crate::error::ApiError;

/// The fewest characters a prefix must have.
pub const MIN_PREFIX: usize = 4;

/// How many candidates an ambiguous prefix names.
pub const SHOWN_CANDIDATES: usize = 5;

/// Stable reasons (ErrorInfo.reason).
pub mod reason {
    /// A prefix matches more than one resource; the message lists them.
    pub const AMBIGUOUS_ID: &str = "AMBIGUOUS_ID";
    /// A prefix shorter than [`super::MIN_PREFIX`] characters.
    pub const ID_PREFIX_TOO_SHORT: &str = "ID_PREFIX_TOO_SHORT";
}

/// What to do with an id that named no resource exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A whole UUID, or not shaped like part of one: it names nothing (NOT_FOUND).
    Nothing,
    /// Look for ids starting with this (lower-cased) text.
    Prefix(String),
}

/// Classifies `id` (already not found as a whole id): a prefix to look up, nothing, or
/// an error for a prefix that is too short. `field` names the request field.
pub fn lookup(field: &str, id: &str) -> Result<Lookup, ApiError> {
    let is_id_text = !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    if !is_id_text || uuid_shaped(id) {
        return Ok(Lookup::Nothing);
    }
    if id.len() < MIN_PREFIX {
        return Err(ApiError::new(
            tonic::Code::InvalidArgument,
            reason::ID_PREFIX_TOO_SHORT,
            format!(
                "{field} {id:?} is too short to stand for an id: give at least {MIN_PREFIX} characters"
            ),
        )
        .with_violation(field, format!("at least {MIN_PREFIX} characters of an id")));
    }
    Ok(Lookup::Prefix(id.to_ascii_lowercase()))
}

/// The one resource among `matches` (the visible resources whose id starts with
/// `prefix`, each with its id); NOT_FOUND for none, AMBIGUOUS_ID for several.
pub fn pick<T>(
    kind: &str,
    field: &str,
    prefix: &str,
    mut matches: Vec<(String, T)>,
) -> Result<T, ApiError> {
    match matches.len() {
        0 => Err(ApiError::not_found(kind, prefix)),
        1 => Ok(matches.remove(0).1),
        n => {
            let ids: Vec<&str> = matches.iter().map(|(id, _)| id.as_str()).collect();
            let shown = ids[..n.min(SHOWN_CANDIDATES)].join(", ");
            let more = if n > SHOWN_CANDIDATES { ", …" } else { "" };
            // The store was asked for at most FETCH_LIMIT: there may be more.
            let count = if i64::try_from(n).unwrap_or(i64::MAX) >= FETCH_LIMIT {
                format!("{n} or more")
            } else {
                n.to_string()
            };
            Err(ApiError::new(
                tonic::Code::InvalidArgument,
                reason::AMBIGUOUS_ID,
                format!(
                    "{field} {prefix:?} matches {count} {kind}s: {shown}{more}; give more characters"
                ),
            )
            .with_violation(field, format!("matches {count} {kind}s"))
            .with_metadata("candidates", shown))
        }
    }
}

/// The most matches a store returns for one prefix (a count above it reads "N or more").
/// More than [`SHOWN_CANDIDATES`], since some rows may still be filtered out as not
/// visible to the caller (a delegated token's workspace scope).
pub const FETCH_LIMIT: i64 = 50;

fn uuid_shaped(id: &str) -> bool {
    id.len() == 36 && uuid_like(id)
}

/// 8-4-4-4-12 hex digits.
fn uuid_like(id: &str) -> bool {
    let groups: Vec<&str> = id.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_text_of_four_or_more_is_a_prefix_whole_ids_and_names_are_not() {
        assert_eq!(
            lookup("build_id", "3fA9").unwrap(),
            Lookup::Prefix("3fa9".into())
        );
        assert_eq!(
            lookup("build_id", "3fa9c2d1-7").unwrap(),
            Lookup::Prefix("3fa9c2d1-7".into())
        );
        assert_eq!(
            lookup("build_id", "3fa9c2d1-0000-4000-8000-000000000000").unwrap(),
            Lookup::Nothing
        );
        assert_eq!(lookup("workspace_id", "calc").unwrap(), Lookup::Nothing);
        assert_eq!(lookup("build_id", "").unwrap(), Lookup::Nothing);
    }

    #[test]
    fn a_short_prefix_is_refused_with_its_own_reason() {
        let err = lookup("build_id", "3f").expect_err("too short");
        assert_eq!(err.reason(), reason::ID_PREFIX_TOO_SHORT);
        assert_eq!(err.violations()[0].field, "build_id");
        assert!(
            err.message().contains("at least 4 characters"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn one_match_is_taken_none_is_not_found_several_are_named() {
        let one = vec![("abcd-1".to_owned(), 1)];
        assert_eq!(pick("build", "build_id", "abcd", one).unwrap(), 1);
        let none: Vec<(String, i32)> = Vec::new();
        let err = pick("build", "build_id", "abcd", none).expect_err("none");
        assert_eq!(err.code(), tonic::Code::NotFound);
        let many = (0..7).map(|i| (format!("abcd-{i}"), i)).collect();
        let err = pick("build", "build_id", "abcd", many).expect_err("ambiguous");
        assert_eq!(err.reason(), reason::AMBIGUOUS_ID);
        assert_eq!(
            err.message(),
            "build_id \"abcd\" matches 7 builds: abcd-0, abcd-1, abcd-2, abcd-3, abcd-4, …; give more characters"
        );
    }
}
