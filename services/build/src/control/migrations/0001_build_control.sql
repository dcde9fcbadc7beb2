-- Build control shared by every kiln-build replica on one Postgres database (schema
-- build_control; see services/build/src/control/postgres.rs). The builds themselves,
-- their events and output stay in the build store; these tables say only who may run
-- what: the queue with its claims and leases, the users' turns, pending cancels and the
-- queue slots promised to StartBuild calls in flight.

-- One row per build from enqueue until its runner finishes (or its lease is reclaimed).
CREATE TABLE queue (
    build_id      TEXT PRIMARY KEY,
    owner         TEXT NOT NULL,
    workspace_id  TEXT NOT NULL,
    -- Queue order within a user.
    seq           BIGSERIAL NOT NULL,
    queued_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    -- The StartBuild call's W3C traceparent: the run is a span of its trace on
    -- whichever replica claims it.
    traceparent   TEXT NOT NULL DEFAULT '',
    -- The replica (a random id per process) running it; NULL while queued.
    claimed_by    TEXT,
    -- Database time after which the claim is abandoned unless renewed.
    lease_until   TIMESTAMPTZ,
    -- A persisted CancelBuild for a claimed build: the grace before SIGKILL.
    cancel_grace_ms BIGINT
);
CREATE INDEX queue_claimed_by ON queue (claimed_by);
CREATE INDEX queue_owner ON queue (owner);
CREATE INDEX queue_workspace ON queue (workspace_id);

-- Round robin between users: the user whose last start is oldest goes next; a user
-- starting a build (or coming back after being idle) goes to the back.
CREATE SEQUENCE turn_seq;
CREATE TABLE turns (
    owner        TEXT PRIMARY KEY,
    last_started BIGINT NOT NULL
);

-- Queue slots promised between StartBuild's limit check and its insert, so that
-- concurrent calls on several replicas cannot exceed the per-user queued limit. A
-- crashed caller's promise expires.
CREATE TABLE reservations (
    id         TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX reservations_owner ON reservations (owner);
