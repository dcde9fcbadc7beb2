//! The audit trail: every login attempt, refresh reuse, key and user change, written to
//! the store (for `ListAuditEvents`) and emitted as a `tracing` event with target `audit`
//! (for log shipping). Records never hold a password, token or key secret.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use kiln_proto::auth as pb;
use kiln_store::Sql;
use sqlx::Row;

use crate::convert::timestamp;
use crate::error::{AuthError, Result};
use crate::paging;
use crate::store::{Store, from_millis, millis};

/// Who acted, as far as it is known.
#[derive(Debug, Clone, Default)]
pub struct Actor {
    pub user_id: String,
    pub username: String,
    pub method: pb::AuthMethod,
    pub api_key_id: String,
}

impl Actor {
    /// The caller of an authenticated RPC.
    pub fn of(principal: &kiln_rpc::Principal) -> Self {
        Self {
            user_id: principal.subject.clone(),
            username: principal.username.clone(),
            method: crate::convert::auth_method(principal.auth_method),
            api_key_id: principal.api_key_id.clone().unwrap_or_default(),
        }
    }

    /// Someone who only named a user (a login attempt).
    pub fn named(user_id: &str, username: &str) -> Self {
        // A failed login keeps at most 64 bytes of the name that was tried.
        let mut end = username.len().min(64);
        while !username.is_char_boundary(end) {
            end -= 1;
        }
        Self {
            user_id: user_id.to_owned(),
            username: username[..end].to_owned(),
            ..Self::default()
        }
    }
}

/// One audit record before it is stored.
#[derive(Debug, Clone)]
pub struct Event {
    pub actor: Actor,
    pub action: &'static str,
    pub target: String,
    pub peer: String,
    /// `None` on success; the ErrorInfo reason on failure.
    pub failure: Option<&'static str>,
    pub details: BTreeMap<String, String>,
}

impl Event {
    pub fn new(actor: Actor, action: &'static str, peer: &str) -> Self {
        Self {
            actor,
            action,
            target: String::new(),
            peer: peer.to_owned(),
            failure: None,
            details: BTreeMap::new(),
        }
    }

    pub fn target(mut self, kind: &str, id: &str) -> Self {
        self.target = format!("{kind}/{id}");
        self
    }

    pub fn failed(mut self, reason: &'static str) -> Self {
        self.failure = Some(reason);
        self
    }

    pub fn detail(mut self, key: &str, value: impl Into<String>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }
}

/// Writes `event` at `now`. A failure to store it is logged, not returned: the audit
/// trail must not turn a store hiccup into a failed login, and the `tracing` record is
/// emitted either way.
pub async fn record(store: &Store, now: SystemTime, event: Event) {
    insert(store, now, &event).await;
}

/// The log record, in the schema every service shares (`kiln_rpc::audit`).
fn trace(event: &Event) {
    let mut record = kiln_rpc::audit::AuditRecord::new("auth", event.action);
    record.failure = event.failure;
    record.actor_user_id = event.actor.user_id.clone();
    record.actor_username = event.actor.username.clone();
    record.actor_method = match event.actor.method {
        pb::AuthMethod::Password => "password",
        pb::AuthMethod::AccessToken => "token",
        pb::AuthMethod::ApiKey => "api_key",
        _ => "",
    };
    record.target_resource = event.target.clone();
    record.peer = event.peer.clone();
    record.details = event.details.clone();
    record.emit();
}

fn outcome(event: &Event) -> &'static str {
    if event.failure.is_some() {
        "failure"
    } else {
        "success"
    }
}

/// Stores `event`; returns its id, or `None` when it could not be stored.
async fn insert(store: &Store, now: SystemTime, event: &Event) -> Option<String> {
    trace(event);
    let details = serde_json::to_string(&event.details).unwrap_or_else(|_| "{}".into());
    let id = event_id(now);
    let result = sqlx::query(
        "INSERT INTO audit_events (id, time, actor_user_id, actor_username, actor_method, \
         actor_key_id, action, target, peer, outcome, reason, details) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(&id)
    .bind(millis(now))
    .bind(&event.actor.user_id)
    .bind(&event.actor.username)
    .bind(event.actor.method.as_str_name())
    .bind(&event.actor.api_key_id)
    .bind(event.action)
    .bind(&event.target)
    .bind(&event.peer)
    .bind(outcome(event))
    .bind(event.failure.unwrap_or(""))
    .bind(details)
    .execute(&store.write)
    .await;
    match result {
        Ok(_) => Some(id),
        Err(e) => {
            tracing::error!(error = %e, action = event.action, "cannot store an audit event");
            None
        }
    }
}

/// How long one aggregated record of refused logins covers.
const AGGREGATE_WINDOW_MS: i64 = 60_000;

/// Most peers with an open aggregate; past it, closed windows are forgotten first.
const MAX_AGGREGATES: usize = 10_000;

/// The audit of logins refused because the account or peer is locked out: these come
/// unauthenticated and as fast as an attacker can send them, so instead of a row each
/// they are aggregated into one row per peer address and minute, whose `attempts`
/// detail counts them (and `last_username` names the latest account tried). The table
/// then grows with the number of attacking addresses and minutes, not of attempts.
#[derive(Debug, Default)]
pub struct RefusalAggregates {
    /// Peer → (window, row id, attempts). Held across the row's update, so the stored
    /// count never goes backwards.
    open: tokio::sync::Mutex<HashMap<String, (i64, String, u64)>>,
}

impl RefusalAggregates {
    /// Counts one refused attempt of `event` from `peer_key` (the peer's address).
    pub async fn record(&self, store: &Store, now: SystemTime, peer_key: &str, event: Event) {
        let window = millis(now) / AGGREGATE_WINDOW_MS;
        let mut open = self.open.lock().await;
        if let Some((w, id, attempts)) = open.get_mut(peer_key)
            && *w == window
        {
            *attempts += 1;
            let details = event
                .details
                .clone()
                .into_iter()
                .chain([
                    ("attempts".to_owned(), attempts.to_string()),
                    ("last_username".to_owned(), event.actor.username.clone()),
                ])
                .collect::<BTreeMap<_, _>>();
            let details = serde_json::to_string(&details).unwrap_or_else(|_| "{}".into());
            let result = sqlx::query("UPDATE audit_events SET details = $1 WHERE id = $2")
                .bind(details)
                .bind(id.as_str())
                .execute(&store.write)
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "cannot update an aggregated audit event");
            }
            return;
        }
        if open.len() >= MAX_AGGREGATES {
            open.retain(|_, (w, _, _)| *w == window);
            if open.len() >= MAX_AGGREGATES {
                open.clear();
            }
        }
        let username = event.actor.username.clone();
        let event = event
            .detail("attempts", "1")
            .detail("last_username", username)
            .detail("aggregated_per_ms", AGGREGATE_WINDOW_MS.to_string());
        if let Some(id) = insert(store, now, &event).await {
            open.insert(peer_key.to_owned(), (window, id, 1));
        }
    }
}

/// An event id that sorts in recording order: the time, then a per-process sequence
/// (events of one millisecond keep their order), then randomness (ids stay unique
/// across processes and restarts).
fn event_id(now: SystemTime) -> String {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let random = &uuid::Uuid::new_v4().simple().to_string()[..12];
    format!("{:012x}{seq:012x}{random}", millis(now))
}

/// One page of `ListAuditEvents`, newest first.
pub async fn list(
    store: &Store,
    request: &pb::ListAuditEventsRequest,
) -> Result<pb::ListAuditEventsResponse> {
    let size = paging::page_size(request.page_size)?;
    let cursor = paging::decode_token(&request.page_token, 2)?;
    let outcome = match request.outcome() {
        pb::AuditOutcome::Unspecified => None,
        pb::AuditOutcome::Success => Some("success"),
        pb::AuditOutcome::Failure => Some("failure"),
    };
    let mut q: Sql = Sql::new("SELECT * FROM audit_events WHERE 1 = 1");
    if let Some(actor) = &request.actor_user_id {
        q.push(" AND actor_user_id = ").bind(actor.clone());
    }
    if let Some(action) = &request.action {
        q.push(" AND action = ").bind(action.clone());
    }
    if let Some(outcome) = outcome {
        q.push(" AND outcome = ").bind(outcome);
    }
    if let Some(start) = &request.start_time {
        q.push(" AND time >= ")
            .bind(crate::convert::timestamp_millis(start, "start_time")?);
    }
    if let Some(end) = &request.end_time {
        q.push(" AND time < ")
            .bind(crate::convert::timestamp_millis(end, "end_time")?);
    }
    if let Some(cursor) = cursor {
        let time: i64 = cursor[0]
            .parse()
            .map_err(|_| AuthError::invalid("page_token", "is not a token from a previous page"))?;
        q.push(" AND (time < ")
            .bind(time)
            .push(" OR (time = ")
            .bind(time)
            .push(" AND id < ")
            .bind(cursor[1].clone())
            .push("))");
    }
    q.push(" ORDER BY time DESC, id DESC LIMIT ")
        .bind(i64::from(size) + 1);
    let rows = q.build().fetch_all(&store.read).await?;
    let mut events = rows.iter().map(event_of_row).collect::<Result<Vec<_>>>()?;
    let next_page_token = paging::next_token(&mut events, size, |(time, e)| {
        paging::encode_token(&[&time.to_string(), &e.id])
    });
    Ok(pb::ListAuditEventsResponse {
        events: events.into_iter().map(|(_, e)| e).collect(),
        next_page_token,
    })
}

fn event_of_row(row: &sqlx::any::AnyRow) -> Result<(i64, pb::AuditEvent)> {
    let time: i64 = row.try_get("time")?;
    let details: String = row.try_get("details")?;
    let method: String = row.try_get("actor_method")?;
    let outcome = match row.try_get::<String, _>("outcome")?.as_str() {
        "success" => pb::AuditOutcome::Success,
        _ => pb::AuditOutcome::Failure,
    };
    let event = pb::AuditEvent {
        id: row.try_get("id")?,
        time: Some(timestamp(from_millis(time))),
        actor: Some(pb::AuditActor {
            user_id: row.try_get("actor_user_id")?,
            username: row.try_get("actor_username")?,
            auth_method: pb::AuthMethod::from_str_name(&method).unwrap_or_default() as i32,
            api_key_id: row.try_get("actor_key_id")?,
        }),
        action: row.try_get("action")?,
        target: row.try_get("target")?,
        peer: row.try_get("peer")?,
        outcome: outcome as i32,
        reason: row.try_get("reason")?,
        details: serde_json::from_str(&details)
            .map_err(|e| AuthError::Corrupt(format!("audit details: {e}")))?,
    };
    Ok((time, event))
}
