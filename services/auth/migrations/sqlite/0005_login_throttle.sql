-- Login throttling in the store, so that every auth replica on one database counts the
-- same guesses (see src/throttle.rs). `kind` is 'account' (the folded username) or
-- 'peer' (an IPv4 address or IPv6 /64). Times are Unix milliseconds.
CREATE TABLE login_counters (
    kind         TEXT NOT NULL,
    key          TEXT NOT NULL,
    failures     BIGINT NOT NULL,
    last_failure BIGINT NOT NULL,
    locked_until BIGINT,
    PRIMARY KEY (kind, key)
);
CREATE INDEX login_counters_last_failure ON login_counters (last_failure);

-- Attempts reserved before their password is checked and not settled yet. A row whose
-- replica died before settling it stops counting at expires_at.
CREATE TABLE login_attempts (
    id         TEXT NOT NULL,
    kind       TEXT NOT NULL,
    key        TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (id, kind)
);
CREATE INDEX login_attempts_key ON login_attempts (kind, key, expires_at);
