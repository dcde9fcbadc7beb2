-- Access-token revocations that every verifier learns through ListRevocations (DESIGN
-- §3.1): access JWTs are checked locally, so revoking a session in this store alone
-- would leave its access tokens working until they expire.
--
-- A row with a session_id revokes every token of that session (Logout, a refresh token
-- replayed). A row without one revokes every token of the user whose `iat_ms` claim is
-- before not_before, except the tokens of keep_session_id (delete, disable, role or
-- password change, RevokeUserSessions). not_before and the tokens' `iat_ms` come from
-- one strictly increasing stamp (see `revocations::Stamps`), so a token is never
-- issued "at the same time" as a revocation. seq is assigned by the one writer (MAX +
-- 1), which keeps the SQL portable. Rows are dropped once no token they affect can
-- still be valid.
CREATE TABLE token_revocations (
    seq             BIGINT PRIMARY KEY,
    user_id         TEXT NOT NULL,
    session_id      TEXT,
    not_before      BIGINT NOT NULL,
    keep_session_id TEXT,
    created_at      BIGINT NOT NULL
);
CREATE INDEX token_revocations_created ON token_revocations (created_at);
