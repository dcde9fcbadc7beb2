//! `kiln users create|list|update|delete` (admins).

use std::io::BufRead;

use anyhow::Context as _;
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use serde_json::json;

use super::{collect_pages, parse_role, rpc_error};
use crate::context::Context;
use crate::output::{OutputFormat, print_json, role_name, user_json};

#[derive(Debug, clap::Subcommand)]
pub enum UsersCommand {
    /// Create a user. The password is read from stdin (first line).
    Create {
        username: String,
        /// viewer, user or admin.
        #[arg(long, value_parser = parse_role, default_value = "user")]
        role: pb::Role,
    },
    /// List users.
    List {
        /// Include disabled users.
        #[arg(long)]
        all: bool,
    },
    /// Change a user's role, disable or enable it, or reset its password (from stdin).
    Update {
        user_id: String,
        #[arg(long, value_parser = parse_role)]
        role: Option<pb::Role>,
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        #[arg(long)]
        enable: bool,
        /// Read a new password from stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Delete a user.
    Delete { user_id: String },
}

fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

pub async fn run(ctx: &Context, command: UsersCommand) -> anyhow::Result<()> {
    let mut auth = AuthServiceClient::new(ctx.authenticated().await?);
    match command {
        UsersCommand::Create { username, role } => {
            let password = read_password()?;
            let user = auth
                .create_user(pb::CreateUserRequest {
                    username,
                    password,
                    role: role as i32,
                    ..Default::default()
                })
                .await
                .map_err(|s| rpc_error(ctx, s))?
                .into_inner();
            match ctx.output {
                OutputFormat::Json => print_json(&user_json(&user)),
                OutputFormat::Text => println!(
                    "user {} ({}) created with id {}",
                    user.username,
                    role_name(user.role),
                    user.id
                ),
            }
        }
        UsersCommand::List { all } => {
            let users = collect_pages(usize::MAX, |page_token| {
                let mut client = auth.clone();
                async move {
                    let page = client
                        .list_users(pb::ListUsersRequest {
                            role: None,
                            include_disabled: all,
                            page_size: 100,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.users, page.next_page_token))
                }
            })
            .await
            .map_err(|s| rpc_error(ctx, s))?;
            match ctx.output {
                OutputFormat::Json => {
                    print_json(&json!(users.iter().map(user_json).collect::<Vec<_>>()))
                }
                OutputFormat::Text => {
                    println!("{:<38} {:<24} {:<7} STATE", "ID", "USERNAME", "ROLE");
                    for u in &users {
                        let state = if u.disabled { "disabled" } else { "active" };
                        println!(
                            "{:<38} {:<24} {:<7} {state}",
                            u.id,
                            u.username,
                            role_name(u.role)
                        );
                    }
                }
            }
        }
        UsersCommand::Update {
            user_id,
            role,
            disable,
            enable,
            password_stdin,
        } => {
            let password = if password_stdin {
                Some(read_password()?)
            } else {
                None
            };
            let disabled = if disable {
                Some(true)
            } else if enable {
                Some(false)
            } else {
                None
            };
            let user = auth
                .update_user(pb::UpdateUserRequest {
                    user_id,
                    role: role.map(|r| r as i32),
                    disabled,
                    password,
                })
                .await
                .map_err(|s| rpc_error(ctx, s))?
                .into_inner()
                .user
                .unwrap_or_default();
            match ctx.output {
                OutputFormat::Json => print_json(&user_json(&user)),
                OutputFormat::Text => println!(
                    "user {} updated: role {}, {}",
                    user.username,
                    role_name(user.role),
                    if user.disabled { "disabled" } else { "active" }
                ),
            }
        }
        UsersCommand::Delete { user_id } => {
            auth.delete_user(pb::DeleteUserRequest {
                user_id: user_id.clone(),
            })
            .await
            .map_err(|s| rpc_error(ctx, s))?;
            match ctx.output {
                OutputFormat::Json => print_json(&json!({ "deleted": user_id })),
                OutputFormat::Text => println!("user {user_id} deleted"),
            }
        }
    }
    Ok(())
}
