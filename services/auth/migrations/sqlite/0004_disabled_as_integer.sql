-- users.disabled becomes INTEGER (0 or 1), as on Postgres. The stores are read through
-- sqlx's `Any` driver (one code path for SQLite and Postgres), which refuses a column
-- declared BOOLEAN on SQLite, even in `SELECT *`. SQLite cannot change a column's type:
-- a new column takes the values, the old one is dropped (it has no index or
-- constraint), the new one takes its name.
ALTER TABLE users ADD COLUMN disabled_flag INTEGER NOT NULL DEFAULT 0;
UPDATE users SET disabled_flag = CASE WHEN disabled THEN 1 ELSE 0 END;
ALTER TABLE users DROP COLUMN disabled;
ALTER TABLE users RENAME COLUMN disabled_flag TO disabled;
