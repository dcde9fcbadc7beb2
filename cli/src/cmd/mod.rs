//! The client commands. Each takes its parsed arguments and the resolved [`Context`].

pub mod agent;
pub mod auth;
pub mod build;
pub mod keys;
pub mod users;
pub mod workspace;

use std::future::Future;

use crate::context::Context;

/// Turns a failed RPC into the CLI's one-line error (with reason and hint).
pub fn rpc_error(ctx: &Context, status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(crate::output::describe_status(&status, &ctx.endpoint))
}

/// Fetches pages until the server says there are no more (or `limit` items are in):
/// `fetch(page_token)` returns one page's items and its `next_page_token`.
pub async fn collect_pages<T, F, Fut>(limit: usize, mut fetch: F) -> Result<Vec<T>, tonic::Status>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut items = Vec::new();
    let mut token = String::new();
    while items.len() < limit {
        let (page, next) = fetch(token).await?;
        items.extend(page);
        if next.is_empty() {
            break;
        }
        token = next;
    }
    items.truncate(limit);
    Ok(items)
}

/// Parses `5m`, `90s`, `2h`, `7d` or a number of seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 5m, 2h or 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?}; use s, m, h or d"
            ));
        }
    };
    Ok(std::time::Duration::from_secs(secs))
}

pub fn proto_duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

pub fn parse_role(text: &str) -> Result<kiln_proto::auth::Role, String> {
    match text {
        "viewer" => Ok(kiln_proto::auth::Role::Viewer),
        "user" => Ok(kiln_proto::auth::Role::User),
        "admin" => Ok(kiln_proto::auth::Role::Admin),
        other => Err(format!("unknown role {other:?}: use viewer, user or admin")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90").expect("ok").as_secs(), 90);
        assert_eq!(parse_duration("5m").expect("ok").as_secs(), 300);
        assert_eq!(parse_duration("2h").expect("ok").as_secs(), 7200);
        assert_eq!(parse_duration("7d").expect("ok").as_secs(), 604_800);
        assert!(parse_duration("5 weeks").is_err());
        assert!(parse_duration("m").is_err());
    }
}
