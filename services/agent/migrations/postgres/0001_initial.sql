-- kiln-agent's tables. Portable SQL (SQLite today, Postgres later): times are Unix
-- microseconds in BIGINT, protobuf blobs in BYTEA (BYTEA).

CREATE TABLE tasks (
    id             TEXT PRIMARY KEY,
    owner          TEXT NOT NULL,
    workspace_id   TEXT NOT NULL,
    -- kiln.agent.v1.Phase; the record says the same, this column is for filters.
    phase          BIGINT NOT NULL,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    last_sequence  BIGINT NOT NULL DEFAULT 0,
    -- The task's spec and the workflow's progress (JSON of `task::TaskRecord`), written
    -- whole at every phase change: what a restart continues from.
    record         TEXT NOT NULL,
    -- The last event of the current build relayed into the task's log (updated with the
    -- relayed events, so a restart relays from there without a gap or a duplicate).
    relayed_build_sequence BIGINT NOT NULL DEFAULT 0,
    -- The delegated token the task acts with (never returned by any RPC). Not the
    -- user's own token: that is only used at StartTask and never stored.
    delegated_token TEXT NOT NULL,
    request_id     TEXT,
    request_hash   TEXT
);
CREATE UNIQUE INDEX tasks_request ON tasks (owner, request_id);
CREATE INDEX tasks_created ON tasks (created_at);
CREATE INDEX tasks_owner ON tasks (owner, created_at);
CREATE INDEX tasks_phase ON tasks (phase);

CREATE TABLE task_labels (
    task_id  TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    key      TEXT NOT NULL,
    value    TEXT NOT NULL,
    PRIMARY KEY (task_id, key)
);
CREATE INDEX task_labels_kv ON task_labels (key, value);

CREATE TABLE task_events (
    task_id   TEXT NOT NULL,
    sequence  BIGINT NOT NULL,
    -- A kiln.agent.v1.TaskEvent.
    event     BYTEA NOT NULL,
    PRIMARY KEY (task_id, sequence)
);
