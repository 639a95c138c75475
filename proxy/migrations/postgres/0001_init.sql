-- Servers added at run time (config-file servers are never stored).
CREATE TABLE servers (
    id          text PRIMARY KEY,
    definition  jsonb NOT NULL,          -- the same shape as a YAML server entry
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Every secret, sealed by proxy.crypto; `kind` is the crypto purpose and
-- (kind, name) the record bound into the ciphertext.
CREATE TABLE secrets (
    kind        text NOT NULL,
    name        text NOT NULL,
    ciphertext  text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, name)
);

-- One row, bumped inside every writing transaction, so that each replica can
-- notice any other's writes with one cheap primary-key read a second. A
-- sequence would be cheaper to bump but moves before the commit is visible,
-- and a poller could then reload too early and miss the write for good.
CREATE TABLE store_changes (
    id       boolean PRIMARY KEY DEFAULT true CHECK (id),
    counter  bigint NOT NULL
);
INSERT INTO store_changes (id, counter) VALUES (true, 0);

CREATE FUNCTION keybearer_bump_changes() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
BEGIN
    UPDATE store_changes SET counter = counter + 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER servers_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON servers
    FOR EACH STATEMENT EXECUTE FUNCTION keybearer_bump_changes();
CREATE TRIGGER secrets_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON secrets
    FOR EACH STATEMENT EXECUTE FUNCTION keybearer_bump_changes();
