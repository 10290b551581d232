-- Claims under a lease and a fencing token (issue 16): the model a job is for ('' = any, as rows from before
-- are), its image count as a column of its own (batches are filled by it), who holds it and until when, the
-- webhook outbox's claims, the workers' advertisements, shared secrets and the fence counter.
ALTER TABLE jobs ADD COLUMN model TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN images INTEGER NOT NULL DEFAULT 1;
ALTER TABLE jobs ADD COLUMN worker TEXT;
ALTER TABLE jobs ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN lease_until REAL;
ALTER TABLE jobs ADD COLUMN webhook_claimed_until REAL;
ALTER TABLE jobs ADD COLUMN webhook_holder TEXT;
UPDATE jobs SET images = COALESCE(json_extract(params, '$.num_images'), 1);
CREATE INDEX jobs_queued_by_key ON jobs (model, batch_key, created) WHERE status = 'queued';
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    models TEXT NOT NULL,  -- a JSON array of variant names
    seen REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE fence_counter (last INTEGER NOT NULL);
INSERT INTO fence_counter VALUES (0);
