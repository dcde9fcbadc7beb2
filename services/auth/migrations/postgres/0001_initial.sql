-- kiln-auth's tables. This service owns them; no other service reads them.
--
-- Portable SQL: it runs unchanged on SQLite and Postgres. Times are BIGINT Unix
-- milliseconds (no engine-specific date types), ids are TEXT (UUIDs), secrets are stored
-- only as lower-case hex SHA-256 digests or Argon2id PHC strings.

CREATE TABLE users (
    id                  TEXT PRIMARY KEY,
    username            TEXT NOT NULL UNIQUE,
    password_hash       TEXT NOT NULL,
    role                TEXT NOT NULL,
    disabled            BIGINT NOT NULL, -- 0 or 1: sqlx::Any cannot carry a SQLite boolean
    created_at          BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL,
    password_changed_at BIGINT NOT NULL,
    last_login_at       BIGINT,
    -- CreateUser's idempotency key.
    create_request_id   TEXT UNIQUE
);

-- A session is a refresh-token family: every token rotated from one login.
CREATE TABLE sessions (
    id                  TEXT PRIMARY KEY,
    user_id             TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at          BIGINT NOT NULL,
    -- The absolute lifetime: no refresh extends the session past this.
    absolute_expires_at BIGINT NOT NULL,
    revoked_at          BIGINT,
    revoked_reason      TEXT,
    peer                TEXT NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);

CREATE TABLE refresh_tokens (
    token_hash TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    -- The idle lifetime, capped at the session's absolute lifetime.
    expires_at BIGINT NOT NULL,
    -- Set when the token was exchanged; a later use is a reuse.
    rotated_at BIGINT
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    prefix       TEXT NOT NULL,
    secret_hash  TEXT NOT NULL,
    role         TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    last_used_at BIGINT,
    revoked_at   BIGINT,
    -- Who created the key and with which idempotency key.
    created_by   TEXT NOT NULL,
    request_id   TEXT,
    UNIQUE (created_by, request_id)
);
CREATE INDEX api_keys_user ON api_keys (user_id, created_at);

-- Ed25519 signing keys. The private key (PKCS#8 DER, base64) lives here: the database
-- file is created 0600 inside the 0700 data directory. Rows are deleted once no
-- unexpired token can carry the key's kid.
CREATE TABLE signing_keys (
    kid        TEXT PRIMARY KEY,
    pkcs8      TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    retired_at BIGINT
);

-- Append-only audit trail.
CREATE TABLE audit_events (
    id             TEXT PRIMARY KEY,
    time           BIGINT NOT NULL,
    actor_user_id  TEXT NOT NULL,
    actor_username TEXT NOT NULL,
    actor_method   TEXT NOT NULL,
    actor_key_id   TEXT NOT NULL,
    action         TEXT NOT NULL,
    target         TEXT NOT NULL,
    peer           TEXT NOT NULL,
    outcome        TEXT NOT NULL,
    reason         TEXT NOT NULL,
    -- A JSON object of string values.
    details        TEXT NOT NULL
);
CREATE INDEX audit_events_time ON audit_events (time, id);
CREATE INDEX audit_events_actor ON audit_events (actor_user_id, time);
