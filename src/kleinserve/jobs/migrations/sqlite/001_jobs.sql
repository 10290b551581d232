-- The schema of the first release, as it created it: databases made before schema_version existed have
-- exactly these tables, so this is a no-op on them.
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    reference_count INTEGER NOT NULL,
    batch_key TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    progress REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    result TEXT,
    usage TEXT,
    webhook_url TEXT,
    webhook_secret TEXT,
    webhook_status TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created);
CREATE INDEX IF NOT EXISTS jobs_with_pending_webhook ON jobs (finished)
    WHERE webhook_url IS NOT NULL AND webhook_status IS NULL;
