//! `kiln keys create|list|revoke`.

use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use serde_json::json;

use super::{collect_pages, parse_duration, parse_role, proto_duration, rpc_error};
use crate::context::Context;
use crate::output::{OutputFormat, api_key_json, print_json, role_name};

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create an API key; its secret is printed once.
    Create {
        /// A name to recognise the key by.
        name: String,
        /// The key's role: viewer, user or admin, at most your own. Default: viewer, the
        /// least; a key that starts builds needs `--role user`.
        #[arg(long, value_parser = parse_role, default_value = "viewer")]
        role: pb::Role,
        /// Lifetime, e.g. 30d or 12h. Default: no expiry.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<std::time::Duration>,
        /// Create the key for another user (admins only).
        #[arg(long)]
        user_id: Option<String>,
    },
    /// List API keys.
    #[command(visible_alias = "ls")]
    List {
        /// Another user's keys (admins only).
        #[arg(long)]
        user_id: Option<String>,
        /// Include revoked keys.
        #[arg(long)]
        all: bool,
    },
    /// Revoke an API key by id (it stays listed with --all).
    #[command(visible_aliases = ["delete", "rm"])]
    Revoke {
        /// The key's id (see `kiln keys list`).
        id: String,
    },
}

pub async fn run(ctx: &Context, command: KeysCommand) -> anyhow::Result<()> {
    let mut auth = AuthServiceClient::new(ctx.authenticated().await?);
    match command {
        KeysCommand::Create {
            name,
            role,
            ttl,
            user_id,
        } => {
            let response = auth
                .create_api_key(pb::CreateApiKeyRequest {
                    name,
                    role: role as i32,
                    ttl: ttl.map(proto_duration),
                    user_id,
                    request_id: uuid::Uuid::new_v4().to_string(),
                })
                .await
                .map_err(|s| rpc_error(ctx, s))?
                .into_inner();
            let key = response.api_key.unwrap_or_default();
            match ctx.output {
                OutputFormat::Json => {
                    print_json(&json!({ "key": response.key, "api_key": api_key_json(&key) }))
                }
                OutputFormat::Text => {
                    println!("{}", response.key);
                    eprintln!(
                        "API key {} ({}, role {}) created; the secret above is shown only once.",
                        key.id,
                        key.name,
                        role_name(key.role)
                    );
                }
            }
        }
        KeysCommand::List { user_id, all } => {
            let keys = collect_pages(usize::MAX, |page_token| {
                let mut client = auth.clone();
                let user_id = user_id.clone();
                async move {
                    let page = client
                        .list_api_keys(pb::ListApiKeysRequest {
                            user_id: user_id.clone(),
                            include_revoked: all,
                            page_size: 100,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.api_keys, page.next_page_token))
                }
            })
            .await
            .map_err(|s| rpc_error(ctx, s))?;
            match ctx.output {
                OutputFormat::Json => {
                    print_json(&json!(keys.iter().map(api_key_json).collect::<Vec<_>>()))
                }
                OutputFormat::Text => {
                    println!(
                        "{:<38} {:<20} {:<7} {:<24} STATE",
                        "ID", "NAME", "ROLE", "EXPIRES"
                    );
                    for k in &keys {
                        let expires = match &k.expires_at {
                            Some(_) => crate::human::local_time(k.expires_at.as_ref()),
                            None => "never".to_owned(),
                        };
                        let state = if k.revoked_at.is_some() {
                            "revoked"
                        } else {
                            "active"
                        };
                        println!(
                            "{:<38} {:<20} {:<7} {:<24} {state}",
                            k.id,
                            k.name,
                            role_name(k.role),
                            expires
                        );
                    }
                }
            }
        }
        KeysCommand::Revoke { id } => {
            auth.revoke_api_key(pb::RevokeApiKeyRequest {
                api_key_id: id.clone(),
            })
            .await
            .map_err(|s| rpc_error(ctx, s))?;
            match ctx.output {
                OutputFormat::Json => print_json(&json!({ "revoked": id })),
                OutputFormat::Text => println!("API key {id} revoked"),
            }
        }
    }
    Ok(())
}
