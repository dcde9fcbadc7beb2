-- Delegated tokens minted by ExchangeToken (RFC 8693 token exchange), one row each.
--
-- The token itself is never stored. The row is what revocation needs: its id is the
-- token's `sid`, so one delegation can be revoked like a session (RevokeApiKey ends the
-- delegations minted from that key), and its created_at keeps the stamps of
-- `revocations::Stamps` above every delegated token's `iat_ms` after a restart. Rows are
-- dropped once the token has expired.
CREATE TABLE delegations (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL,
    actor        TEXT NOT NULL,
    audience     TEXT NOT NULL,
    task_id      TEXT NOT NULL,
    workspace_id TEXT,
    api_key_id   TEXT,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL
);
CREATE INDEX delegations_expires ON delegations (expires_at);
CREATE INDEX delegations_api_key ON delegations (api_key_id);
