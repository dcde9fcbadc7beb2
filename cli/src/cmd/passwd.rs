//! `kiln passwd`: change your own password (ChangePassword). The current password is
//! checked by the server; every other session of yours ends (their tokens stop working
//! at every service within seconds), this login stays.

use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use serde_json::json;

use super::password::Source;
use super::rpc_error;
use crate::context::Context;
use crate::output::{OutputFormat, print_json};

#[derive(Debug, clap::Args)]
pub struct PasswdArgs {
    /// Read the current and the new password from stdin (a line each) instead of
    /// asking on the terminal.
    #[arg(long)]
    password_stdin: bool,
}

pub async fn run(ctx: &Context, args: PasswdArgs) -> anyhow::Result<()> {
    let source = Source::pick(args.password_stdin);
    let old_password = source.read("current password: ")?;
    let new_password = source.read_new("new password: ")?;
    let mut auth = AuthServiceClient::new(ctx.authenticated().await?);
    let who = auth
        .who_am_i(pb::WhoAmIRequest::default())
        .await
        .map_err(|s| rpc_error(ctx, s))?
        .into_inner()
        .principal
        .unwrap_or_default();
    let revoked = auth
        .change_password(pb::ChangePasswordRequest {
            old_password,
            new_password,
        })
        .await
        .map_err(|status| {
            // The generic message for this reason is about logging in; here it means
            // the one password the user typed first.
            if kiln_rpc::RemoteError::from_status(&status).reason == "INVALID_CREDENTIALS" {
                anyhow::anyhow!("the current password is wrong; the password was not changed")
            } else {
                rpc_error(ctx, status)
            }
        })?
        .into_inner()
        .revoked_sessions;
    match ctx.output {
        OutputFormat::Json => print_json(
            &json!({ "username": who.username, "password_changed": true, "revoked_sessions": revoked }),
        ),
        _ if who.session_id.is_empty() => println!(
            "password of {} changed; {revoked} session(s) ended",
            who.username
        ),
        _ => println!(
            "password of {} changed; {revoked} other session(s) ended, this login stays",
            who.username
        ),
    }
    Ok(())
}
