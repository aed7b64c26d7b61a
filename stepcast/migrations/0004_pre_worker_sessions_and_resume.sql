-- Failover in seconds, and resuming (docs/reliability.md, "A worker dies").
--
-- A worker holds a session-level advisory lock, (class 1589682462, its session
-- number), on a Postgres connection of its own for as long as it lives: the
-- lock goes when the process (or its connection) does, a second or so before
-- any lease would run out. A claim and every heartbeat record the number in
-- the job's row; the recovery pass takes back a processing job whose number no
-- session holds. Rows claimed by older workers leave it NULL: their lease alone
-- says whether they live. Numbers come from a sequence, so no two workers
-- share one.
CREATE SEQUENCE IF NOT EXISTS worker_sessions AS integer CYCLE;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS worker_session integer;
COMMENT ON COLUMN jobs.worker_session IS
    'The session number of the worker running the job (its advisory lock says whether it lives); NULL: the lease alone.';

-- The step a retried attempt resumes from: the newest checkpoint of an earlier
-- attempt when the job went back to the queue, corrected by the attempt that
-- took it (0 when the checkpoint was gone). NULL: never resumed.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS resumed_from_step integer;
COMMENT ON COLUMN jobs.resumed_from_step IS
    'The step the current (or next) attempt resumes from; NULL when no attempt resumed.';

-- Whether a worker session is alive: some connection to this database holds its lock.
CREATE OR REPLACE FUNCTION worker_session_alive(session integer) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM pg_locks
        WHERE locktype = 'advisory' AND granted AND objsubid = 2
          AND classid = 1589682462::oid AND objid = session::oid
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
    )
$$;
