-- Servers added at run time (config-file servers are never stored).
CREATE TABLE servers (
    id          TEXT PRIMARY KEY,
    definition  TEXT NOT NULL,          -- JSON, the same shape as a YAML server entry
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);

-- Every secret, sealed by proxy.crypto; `kind` is the crypto purpose and
-- (kind, name) the record bound into the ciphertext.
CREATE TABLE secrets (
    kind        TEXT NOT NULL,
    name        TEXT NOT NULL,
    ciphertext  TEXT NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (kind, name)
);
