-- Jobs by status, kept. GET /metrics reads these rows (kind 'status', key the
-- status) instead of counting the jobs table on every scrape, and retention's
-- deletes of old finished jobs keep them right. Lock order: a job's status rows
-- are taken before its queue's and owner's rows (these triggers' names sort
-- before the baseline's jobs_count_*, and Postgres fires a row's triggers in
-- name order), and its two status rows in the order of their names, so every
-- statement takes them in one order and none waits for another in a circle.
ALTER TABLE job_counts DROP CONSTRAINT IF EXISTS job_counts_kind;
ALTER TABLE job_counts ADD CONSTRAINT job_counts_kind CHECK (kind IN ('pending', 'unfinished', 'status'));
COMMENT ON COLUMN job_counts.key IS
    'The queue (kind pending), the owner (kind unfinished) or the status (kind status).';

CREATE OR REPLACE FUNCTION jobs_count_status() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM job_counts_add('status', NEW.status::text, 1);
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM job_counts_add('status', OLD.status::text, -1);
    ELSIF OLD.status::text < NEW.status::text THEN
        PERFORM job_counts_add('status', OLD.status::text, -1);
        PERFORM job_counts_add('status', NEW.status::text, 1);
    ELSE
        PERFORM job_counts_add('status', NEW.status::text, 1);
        PERFORM job_counts_add('status', OLD.status::text, -1);
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;

-- Counted with job writes held off until this migration commits, so that the
-- counts start exact and the triggers below carry them on.
LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE;
DELETE FROM job_counts WHERE kind = 'status';
INSERT INTO job_counts (kind, key, shard, n)
    SELECT 'status', status::text, 0, count(*) FROM jobs GROUP BY status;
DROP TRIGGER IF EXISTS jobs_by_status_new ON jobs;
CREATE TRIGGER jobs_by_status_new AFTER INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION jobs_count_status();
DROP TRIGGER IF EXISTS jobs_by_status_gone ON jobs;
CREATE TRIGGER jobs_by_status_gone AFTER DELETE ON jobs FOR EACH ROW EXECUTE FUNCTION jobs_count_status();
DROP TRIGGER IF EXISTS jobs_by_status_change ON jobs;
CREATE TRIGGER jobs_by_status_change AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION jobs_count_status();

-- ---------------------------------------------------------------------------
-- Retention of rows: old finished jobs and finished webhook deliveries are deleted in
-- bounded batches (stepcast/retention.py), found through these indexes rather
-- than by reading the tables.
CREATE INDEX IF NOT EXISTS jobs_finished_idx ON jobs (finished_at)
    WHERE status IN ('completed', 'failed', 'canceled');
CREATE INDEX IF NOT EXISTS webhook_deliveries_finished_idx ON webhook_deliveries (created_at)
    WHERE status <> 'pending';
