-- Output bytes live in an append-only file per build (<data_dir>/logs/<build_id>.out);
-- an Output event's row keeps its metadata and where its bytes are in that file.
-- Rows without these columns (older logs) carry their bytes in `event` itself.
ALTER TABLE build_events ADD COLUMN data_offset BIGINT;
ALTER TABLE build_events ADD COLUMN data_len BIGINT;
