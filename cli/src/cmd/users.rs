//! `kiln users create|list|update|delete` (admins).

use anyhow::anyhow;
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use serde_json::json;

use super::password::Source;
use super::{collect_pages, parse_role, rpc_error};
use crate::context::Context;
use crate::output::{OutputFormat, print_json, role_name, user_json};

#[derive(Debug, clap::Subcommand)]
pub enum UsersCommand {
    /// Create a user. On a terminal the password is asked for (twice, not shown);
    /// otherwise it is the first line of stdin.
    Create {
        /// The login name: lower-case letters, digits, `.`, `_` and `-`, starting with a
        /// letter.
        username: String,
        /// viewer, user or admin.
        #[arg(long, value_parser = parse_role, default_value = "user")]
        role: pb::Role,
        /// Read the password from stdin even on a terminal.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users.
    #[command(visible_alias = "ls")]
    List {
        /// Include disabled users.
        #[arg(long)]
        all: bool,
    },
    /// Change a user's role, disable or enable it, or reset its password. Every change
    /// ends the user's sessions.
    Update {
        /// The user: username or id.
        user: String,
        /// The new role: viewer, user or admin.
        #[arg(long, value_parser = parse_role)]
        role: Option<pb::Role>,
        /// Disable the account: no logins, its API keys stop working.
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        /// Re-enable a disabled account.
        #[arg(long)]
        enable: bool,
        /// Set a new password, asked for on the terminal (twice, not shown).
        #[arg(long, conflicts_with = "password_stdin")]
        password: bool,
        /// Set a new password read from stdin (first line).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Delete a user.
    #[command(visible_alias = "rm")]
    Delete {
        /// The user: username or id.
        user: String,
    },
}

/// All users, disabled ones included (user management is for admins, and a suite has
/// few enough users that one listing is cheaper than a second RPC to learn).
async fn all_users(
    auth: &AuthServiceClient<kiln_rpc::client::KilnChannel>,
) -> Result<Vec<pb::User>, tonic::Status> {
    collect_pages(usize::MAX, |page_token| {
        let mut client = auth.clone();
        async move {
            let page = client
                .list_users(pb::ListUsersRequest {
                    role: None,
                    include_disabled: true,
                    page_size: 1000,
                    page_token,
                })
                .await?
                .into_inner();
            Ok((page.users, page.next_page_token))
        }
    })
    .await
}

/// The user named `who`: a username (as typed; usernames are lower case) or an id.
async fn find_user(
    ctx: &Context,
    auth: &AuthServiceClient<kiln_rpc::client::KilnChannel>,
    who: &str,
) -> anyhow::Result<pb::User> {
    let users = all_users(auth).await.map_err(|s| rpc_error(ctx, s))?;
    let lower = who.to_lowercase();
    users
        .iter()
        .find(|u| u.username == lower)
        .or_else(|| users.iter().find(|u| u.id == who))
        .cloned()
        .ok_or_else(|| anyhow!("no user {who:?} (neither a username nor a user id)\nhint: `kiln users list --all` shows every user"))
}

pub async fn run(ctx: &Context, command: UsersCommand) -> anyhow::Result<()> {
    let mut auth = AuthServiceClient::new(ctx.authenticated().await?);
    match command {
        UsersCommand::Create {
            username,
            role,
            password_stdin,
        } => {
            let password =
                Source::pick(password_stdin).read_new(&format!("password for {username}: "))?;
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
            user,
            role,
            disable,
            enable,
            password,
            password_stdin,
        } => {
            let target = find_user(ctx, &auth, &user).await?;
            let password = if password {
                Some(
                    Source::Terminal
                        .read_new(&format!("new password for {}: ", target.username))?,
                )
            } else if password_stdin {
                Some(Source::Stdin.read("")?)
            } else {
                None
            };
            let user_id = target.id;
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
        UsersCommand::Delete { user } => {
            let target = find_user(ctx, &auth, &user).await?;
            auth.delete_user(pb::DeleteUserRequest {
                user_id: target.id.clone(),
            })
            .await
            .map_err(|s| rpc_error(ctx, s))?;
            match ctx.output {
                OutputFormat::Json => {
                    print_json(&json!({ "deleted": target.id, "username": target.username }))
                }
                OutputFormat::Text => {
                    println!("user {} ({}) deleted", target.username, target.id)
                }
            }
        }
    }
    Ok(())
}
