-- Task control shared by every kiln-agent replica on one Postgres database (schema
-- agent_control; see services/agent/src/control/postgres.rs). The tasks, their records
-- and events stay in the agent store; this table says only who runs which task.

-- One row per unfinished task that a replica claimed, or that was cancelled or found
-- unowned; deleted when its runner stores the task's end.
CREATE TABLE claims (
    task_id      TEXT PRIMARY KEY,
    -- The replica (a random id per process) running it; NULL while nobody does.
    claimed_by   TEXT,
    -- Database time after which the claim is abandoned unless renewed.
    lease_until  TIMESTAMPTZ,
    -- A persisted CancelTask: the runner, wherever it is, ends the task CANCELLED.
    cancel_requested BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX claims_claimed_by ON claims (claimed_by);
