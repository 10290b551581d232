-- API keys as SHA-256 digests (api/postgres_keys.py), the same table as SQLite's (api/auth.py).
CREATE TABLE api_keys (
    name text PRIMARY KEY,
    digest text NOT NULL UNIQUE,
    created double precision NOT NULL,
    revoked double precision
);
