-- Jobs (the queue itself), the fence sequence, the workers' advertisements and shared secrets.
-- Times are Unix seconds (double precision), as in SQLite, so both stores hand out the same Job values. The
-- JSON columns are text: nothing queries inside them, and the one codec of jobs/sql.py writes both databases.
CREATE TABLE jobs (
    id text PRIMARY KEY,
    owner text NOT NULL,
    status text NOT NULL,
    model text NOT NULL DEFAULT '',
    params text NOT NULL,
    images integer NOT NULL DEFAULT 1,
    reference_count integer NOT NULL,
    batch_key text NOT NULL,
    created double precision NOT NULL,
    started double precision,
    finished double precision,
    progress double precision NOT NULL DEFAULT 0,
    attempts integer NOT NULL DEFAULT 0,
    error text,
    result text,
    usage text,
    webhook_url text,
    webhook_secret text,
    webhook_status text,
    webhook_claimed_until double precision,
    webhook_holder text,
    cancel_requested boolean NOT NULL DEFAULT false,
    extra text NOT NULL DEFAULT '{}',
    worker text,
    fence bigint NOT NULL DEFAULT 0,
    lease_until double precision
);
CREATE INDEX jobs_by_status ON jobs (status, created);
CREATE INDEX jobs_by_owner ON jobs (owner, created);
CREATE INDEX jobs_queued_by_key ON jobs (model, batch_key, created) WHERE status = 'queued';
CREATE INDEX jobs_with_pending_webhook ON jobs (finished)
    WHERE webhook_url IS NOT NULL AND webhook_status IS NULL;
CREATE SEQUENCE job_fence;
CREATE TABLE workers (
    id text PRIMARY KEY,
    models text NOT NULL,  -- a JSON array of variant names
    seen double precision NOT NULL,
    expires double precision NOT NULL
);
CREATE TABLE secrets (name text PRIMARY KEY, value bytea NOT NULL);
