-- A workspace may have a name, unique per owner, accepted wherever its id is.
-- NULL (no name) is allowed any number of times: SQLite's unique indexes treat NULLs
-- as distinct.
ALTER TABLE workspaces ADD COLUMN name TEXT;
CREATE UNIQUE INDEX workspaces_name ON workspaces (owner, name);
