-- Whether a connection holds a refresh token, kept plain for the listings
-- (connections page, admin API). Rows from before say yes: the sealed tokens
-- still decide what the lifecycle does.
ALTER TABLE connections ADD COLUMN refreshable INTEGER NOT NULL DEFAULT 1;
