-- Browser sessions (login.py): sealed records under the hash of their id.
-- Rows past `expires_at` count as absent and are purged on later writes.
CREATE TABLE sessions (
    key         TEXT PRIMARY KEY,
    sealed      TEXT NOT NULL,
    expires_at  REAL NOT NULL
);
