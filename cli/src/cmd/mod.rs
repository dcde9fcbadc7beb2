//! The client commands. Each takes its parsed arguments and the resolved [`Context`].

pub mod agent;
pub mod auth;
pub mod build;
pub mod build_follow;
pub mod build_logs;
pub mod build_policy;
pub mod build_view;
pub mod client_config;
pub mod completion;
pub mod keys;
pub mod paging;
pub mod passwd;
pub mod password;
pub mod progress;
pub mod reconnect;
pub mod terminal;
pub mod users;
pub mod version;
pub mod workspace;

use std::future::Future;

use crate::context::Context;

/// Turns a failed RPC into the CLI's one-line error (with reason and hint).
pub fn rpc_error(ctx: &Context, status: tonic::Status) -> anyhow::Error {
    // A status the transport made up (no kiln reason) may hide a TLS or protocol
    // failure that deserves its own message.
    if kiln_rpc::RemoteError::from_status(&status)
        .reason
        .is_empty()
        && let Some(line) = ctx.diagnose(&status)
    {
        return anyhow::anyhow!("cannot talk to kiln at {}: {line}", ctx.endpoint);
    }
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

pub use kiln_config::parse_duration;

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
