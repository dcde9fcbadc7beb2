//! `kiln login`, `kiln logout`, `kiln whoami`.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context as _, anyhow};
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use serde_json::json;

use super::rpc_error;
use crate::context::{Context, Credentials, timestamp_secs};
use crate::output::{OutputFormat, principal_json, print_json, role_name};

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// The user name (asked for when missing and a terminal is attached).
    #[arg(long, short = 'u', env = "KILN_USERNAME")]
    username: Option<String>,
    /// Read the password from standard input (first line) instead of prompting.
    #[arg(long)]
    password_stdin: bool,
}

#[derive(Debug, clap::Args)]
pub struct LogoutArgs {
    /// End every session of this user, not just this one.
    #[arg(long)]
    all: bool,
}

fn prompt(question: &str) -> anyhow::Result<String> {
    eprint!("{question}");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

pub async fn login(ctx: &Context, args: LoginArgs) -> anyhow::Result<()> {
    let interactive = std::io::stdin().is_terminal();
    let username = match args.username {
        Some(u) => u,
        None if interactive && !args.password_stdin => prompt("username: ")?,
        None => {
            return Err(anyhow!(
                "no user name: pass --username (or set KILN_USERNAME)"
            ));
        }
    };
    let password = if args.password_stdin || !interactive {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        rpassword::prompt_password("password: ").context("reading the password")?
    };
    let mut auth = AuthServiceClient::new(ctx.anonymous().await?);
    let response = auth
        .login(pb::LoginRequest {
            username: username.clone(),
            password,
        })
        .await
        .map_err(|s| rpc_error(ctx, s))?
        .into_inner();
    let principal = response.principal.clone().unwrap_or_default();
    ctx.save_credentials(Credentials {
        username: principal.username.clone(),
        access_token: response.access_token,
        refresh_token: response.refresh_token,
        access_expires_at: timestamp_secs(response.access_expires_at.as_ref()),
        refresh_expires_at: timestamp_secs(response.refresh_expires_at.as_ref()),
    })?;
    match ctx.output {
        OutputFormat::Json => print_json(
            &json!({ "endpoint": ctx.endpoint, "principal": principal_json(&principal) }),
        ),
        OutputFormat::Text => {
            println!(
                "logged in to {} as {} ({})",
                ctx.endpoint,
                principal.username,
                role_name(principal.role)
            );
        }
    }
    Ok(())
}

pub async fn logout(ctx: &Context, args: LogoutArgs) -> anyhow::Result<()> {
    let revoked = match ctx.authenticated().await {
        Ok(channel) => {
            let response = AuthServiceClient::new(channel)
                .logout(pb::LogoutRequest {
                    all_sessions: args.all,
                })
                .await
                .map_err(|s| rpc_error(ctx, s));
            response.map(|r| r.into_inner().revoked_sessions).ok()
        }
        Err(_) => None,
    };
    let forgotten = ctx.forget_credentials()?;
    match ctx.output {
        OutputFormat::Json => print_json(
            &json!({ "endpoint": ctx.endpoint, "revoked_sessions": revoked, "was_logged_in": forgotten.is_some() }),
        ),
        OutputFormat::Text => match (forgotten, revoked) {
            (None, _) => println!("not logged in to {}", ctx.endpoint),
            (Some(c), Some(n)) => println!("logged out {} ({n} session(s) ended)", c.username),
            (Some(c), None) => println!(
                "logged out {} (the server could not be told; the saved tokens are gone)",
                c.username
            ),
        },
    }
    Ok(())
}

pub async fn whoami(ctx: &Context) -> anyhow::Result<()> {
    let principal = AuthServiceClient::new(ctx.authenticated().await?)
        .who_am_i(pb::WhoAmIRequest::default())
        .await
        .map_err(|s| rpc_error(ctx, s))?
        .into_inner()
        .principal
        .unwrap_or_default();
    match ctx.output {
        OutputFormat::Json => print_json(&principal_json(&principal)),
        OutputFormat::Text => {
            let method = pb::AuthMethod::try_from(principal.auth_method).unwrap_or_default();
            println!(
                "{} ({}) at {}",
                principal.username,
                role_name(principal.role),
                ctx.endpoint
            );
            println!("  user id:   {}", principal.user_id);
            println!(
                "  signed in: {}",
                method
                    .as_str_name()
                    .trim_start_matches("AUTH_METHOD_")
                    .to_lowercase()
                    .replace('_', " ")
            );
            if principal.expires_at.is_some() {
                println!(
                    "  expires:   {}",
                    crate::human::local_time_and_relative(principal.expires_at.as_ref())
                );
            }
        }
    }
    Ok(())
}
