-- kiln-build's tables. Portable SQL (SQLite today, Postgres later): no SQLite-only
-- syntax, times are Unix microseconds in BIGINT, protobuf blobs in BLOB (BYTEA).

CREATE TABLE workspaces (
    id            TEXT PRIMARY KEY,
    owner         TEXT NOT NULL,
    size_bytes    BIGINT NOT NULL DEFAULT 0,
    file_count    BIGINT NOT NULL DEFAULT 0,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    -- Last change through the API or last build start: what retention calls "idle".
    last_used_at  BIGINT NOT NULL,
    request_id    TEXT,
    request_hash  TEXT
);
CREATE UNIQUE INDEX workspaces_request ON workspaces (owner, request_id);
CREATE INDEX workspaces_owner ON workspaces (owner, created_at);

CREATE TABLE workspace_labels (
    workspace_id  TEXT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    key           TEXT NOT NULL,
    value         TEXT NOT NULL,
    PRIMARY KEY (workspace_id, key)
);
CREATE INDEX workspace_labels_kv ON workspace_labels (key, value);

CREATE TABLE builds (
    id               TEXT PRIMARY KEY,
    -- Not a foreign key: a build and its log outlive its workspace.
    workspace_id     TEXT NOT NULL,
    owner            TEXT NOT NULL,
    state            INTEGER NOT NULL,
    -- The request as accepted (steps, env, effective limits, labels): a kiln.build.v1.Build
    -- message with only those fields set.
    spec             BLOB NOT NULL,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT,
    failure_message  TEXT NOT NULL DEFAULT '',
    last_sequence    BIGINT NOT NULL DEFAULT 0,
    current_step     INTEGER,
    -- StepFinished messages, each length-delimited, in step order.
    step_results     BLOB NOT NULL,
    request_id       TEXT,
    request_hash     TEXT
);
CREATE UNIQUE INDEX builds_request ON builds (owner, request_id);
CREATE INDEX builds_created ON builds (created_at);
CREATE INDEX builds_workspace ON builds (workspace_id, state);
CREATE INDEX builds_state ON builds (state);

CREATE TABLE build_labels (
    build_id  TEXT NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    key       TEXT NOT NULL,
    value     TEXT NOT NULL,
    PRIMARY KEY (build_id, key)
);
CREATE INDEX build_labels_kv ON build_labels (key, value);

CREATE TABLE build_events (
    build_id  TEXT NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    sequence  BIGINT NOT NULL,
    time      BIGINT NOT NULL,
    -- The encoded kiln.build.v1.BuildEvent.
    event     BLOB NOT NULL,
    PRIMARY KEY (build_id, sequence)
);
