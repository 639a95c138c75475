-- What the embedded deployment keeps where a shared one uses Redis: per-user
-- connections, pending authorizations, locks, caches and change events.
-- Rows past `expires_at` count as absent and are purged on later writes.

-- One user's connection to one OAuth server. Only `sealed` is secret.
CREATE TABLE connections (
    user         TEXT NOT NULL,
    server       TEXT NOT NULL,
    state        TEXT NOT NULL,
    sealed       TEXT,
    issuer       TEXT,
    client_id    TEXT,
    scopes       TEXT NOT NULL DEFAULT '',   -- space-separated, as in OAuth
    expires_at   REAL,
    obtained_at  REAL NOT NULL,
    last_error   TEXT,
    version      INTEGER NOT NULL,
    PRIMARY KEY (user, server)
);
CREATE INDEX connections_by_server ON connections (server);

CREATE TABLE pending (
    key         TEXT PRIMARY KEY,
    sealed      TEXT NOT NULL,
    expires_at  REAL NOT NULL
);

CREATE TABLE locks (
    name        TEXT PRIMARY KEY,
    token       TEXT NOT NULL,
    expires_at  REAL NOT NULL
);

CREATE TABLE cache (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    expires_at  REAL NOT NULL
);

-- AUTOINCREMENT so that an id is never reused after a purge: pollers read
-- everything above the last id they saw.
CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    event       TEXT NOT NULL,
    created_at  REAL NOT NULL
);
