-- stepcast schema, migration 0001: the baseline. Postgres is the source of
-- truth for every job: a row exists before anything is enqueued, and state only
-- moves forward (pending -> processing -> completed | failed | canceled).
--
-- This is the schema.sql that every process applied at start-up before the
-- schema had versions (docs/migrations.md). It stays written to run again: it
-- brings a database made by any earlier schema.sql up to date, as well as an
-- empty one. Later changes are new numbered files next to it, never edits here.

CREATE EXTENSION IF NOT EXISTS pgcrypto;

DO $$
BEGIN
    CREATE TYPE job_status AS ENUM ('pending', 'processing', 'completed', 'failed', 'canceled');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

CREATE TABLE IF NOT EXISTS jobs (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    owner            text NOT NULL,
    params           jsonb NOT NULL,
    preview          jsonb,
    status           job_status NOT NULL DEFAULT 'pending',
    attempt          integer NOT NULL DEFAULT 0,
    queue            text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    progress_step    integer NOT NULL DEFAULT 0,
    progress_total   integer NOT NULL,
    result           jsonb,
    error_code       text,
    error_message    text,
    queue_s          double precision,
    run_s            double precision,
    worker           text,
    lease_expires_at timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    last_seq         bigint NOT NULL DEFAULT 0,
    model_name       text NOT NULL,
    model_revision   text,
    stepcast_version text NOT NULL,
    CONSTRAINT jobs_attempt_nonnegative CHECK (attempt >= 0),
    CONSTRAINT jobs_progress_in_range CHECK (progress_step BETWEEN 0 AND progress_total),
    CONSTRAINT jobs_error_when_failed CHECK ((status = 'failed') = (error_code IS NOT NULL))
);

ALTER TABLE jobs ADD COLUMN IF NOT EXISTS webhook jsonb;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS handoffs integer NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS queue_expires_at timestamptz;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS idempotency_key text;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS request_hash text;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS images_expired_at timestamptz;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS pipeline_s double precision;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS batch_size integer;
-- Rows made before seq blocks start at 0 (their first block skips past what the
-- old per-job Redis counter may have handed out); a new job owns seqs 1..1024.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS seq_ceiling bigint NOT NULL DEFAULT 0;
ALTER TABLE jobs ALTER COLUMN seq_ceiling SET DEFAULT 1024;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS claim_token uuid;

COMMENT ON TABLE jobs IS 'One row per generation request; the authoritative job state.';
COMMENT ON COLUMN jobs.id IS 'Random UUID: unguessable, also the arq job id and the storage key prefix.';
COMMENT ON COLUMN jobs.owner IS 'Who may see, watch, cancel and fetch this job (API key owner or browser session).';
COMMENT ON COLUMN jobs.params IS 'Validated generation parameters, defaults filled in; the seed is always stored.';
COMMENT ON COLUMN jobs.preview IS 'Requested step previews {every, max_px}, or NULL for none.';
COMMENT ON COLUMN jobs.webhook IS 'Requested webhook {url, events}, or NULL; deliveries are recorded separately.';
COMMENT ON COLUMN jobs.status IS 'pending -> processing -> completed | failed | canceled; never moves backwards.';
COMMENT ON COLUMN jobs.attempt IS 'Number of claims so far; every worker write is fenced by it.';
COMMENT ON COLUMN jobs.handoffs IS 'Attempts a worker handed back on shutdown; they do not count against max attempts.';
COMMENT ON COLUMN jobs.queue_expires_at IS 'A job still pending at this time fails with code expired (the queue TTL).';
COMMENT ON COLUMN jobs.idempotency_key IS 'Client key: a repeat submit by the same owner returns this job.';
COMMENT ON COLUMN jobs.request_hash IS 'Hash of the submitted request, to refuse a reused idempotency key with other params.';
COMMENT ON COLUMN jobs.images_expired_at IS 'When retention deleted the images; the row and its result metadata stay.';
COMMENT ON COLUMN jobs.queue IS 'arq queue the job was enqueued on (one per model family).';
COMMENT ON COLUMN jobs.started_at IS 'When the current (latest) attempt was claimed; for a completed job, when its model call began if that was earlier (a job alone starts while its claim is in flight).';
COMMENT ON COLUMN jobs.finished_at IS 'When the job reached a terminal status.';
COMMENT ON COLUMN jobs.progress_step IS 'Last denoising step reported (1..total), persisted on each heartbeat.';
COMMENT ON COLUMN jobs.progress_total IS 'Denoising steps the job runs.';
COMMENT ON COLUMN jobs.result IS '{"images": [{key, width, height, seed, content_type}]} once completed.';
COMMENT ON COLUMN jobs.error_code IS 'Machine-readable failure reason (pipeline_error, ...); set iff failed.';
COMMENT ON COLUMN jobs.error_message IS 'Human-readable failure detail.';
COMMENT ON COLUMN jobs.queue_s IS 'Seconds from creation to the start of the attempt that finished (started_at).';
COMMENT ON COLUMN jobs.run_s IS 'Seconds the finishing attempt ran, started_at to terminal state.';
COMMENT ON COLUMN jobs.pipeline_s IS 'Seconds of the model call that made the images (shared by every job in its batch).';
COMMENT ON COLUMN jobs.batch_size IS 'How many jobs shared that model call (dynamic batching).';
COMMENT ON COLUMN jobs.worker IS 'Worker id holding (or last holding) the job.';
COMMENT ON COLUMN jobs.lease_expires_at IS 'Processing jobs only: the worker must heartbeat before this time.';
COMMENT ON COLUMN jobs.cancel_requested IS 'Set by a cancel of a processing job; the worker stops at the next step.';
COMMENT ON COLUMN jobs.last_seq IS 'Highest event seq recorded for the job (terminal events are recorded before publishing).';
COMMENT ON COLUMN jobs.seq_ceiling IS 'Every event seq ever handed out for the job is at most this: seqs come in blocks reserved here (docs/events.md), so a seq is never reused, whatever Redis loses.';
COMMENT ON COLUMN jobs.claim_token IS 'Random token of the claim that started the current attempt: a retried claim whose reply was lost recognises its own.';
COMMENT ON COLUMN jobs.model_name IS 'Model that serves the job.';
COMMENT ON COLUMN jobs.model_revision IS 'What produced the result: a content hash of the model directory, or org/name@<commit> for a model loaded by Hugging Face id.';
COMMENT ON COLUMN jobs.stepcast_version IS 'stepcast version that accepted the job.';

-- History: an owner's jobs newest first (GET /v1/jobs), optionally by status.
CREATE INDEX IF NOT EXISTS jobs_owner_created_idx ON jobs (owner, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS jobs_owner_status_created_idx ON jobs (owner, status, created_at DESC, id DESC);
-- Queue position: pending jobs of a queue in arrival order.
CREATE INDEX IF NOT EXISTS jobs_pending_idx ON jobs (queue, created_at, id) WHERE status = 'pending';
-- Unfinished jobs per queue: what KEDA's postgresql trigger counts every
-- polling interval (deploy/k8s), without reading the finished history.
CREATE INDEX IF NOT EXISTS jobs_unfinished_idx ON jobs (queue) WHERE status IN ('pending', 'processing');
-- ETA: the workers running jobs of a queue (without reading its pending ones).
CREATE INDEX IF NOT EXISTS jobs_processing_idx ON jobs (queue) WHERE status = 'processing';
-- ETA: recent run times of finished jobs.
CREATE INDEX IF NOT EXISTS jobs_completed_finished_idx ON jobs (queue, finished_at DESC) WHERE status = 'completed';
-- Idempotency: one job per owner and key.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_owner_idempotency_key_idx ON jobs (owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Queue TTL: pending jobs by expiry.
CREATE INDEX IF NOT EXISTS jobs_pending_expiry_idx ON jobs (queue_expires_at) WHERE status = 'pending';
-- Retention: finished jobs whose images are still stored.
CREATE INDEX IF NOT EXISTS jobs_images_kept_idx ON jobs (finished_at)
    WHERE result IS NOT NULL AND images_expired_at IS NULL;

-- API keys of programmatic clients. Only a hash of each key is stored; the key
-- itself is shown once, when `stepcast keys create` makes it.
CREATE TABLE IF NOT EXISTS api_keys (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    owner        text NOT NULL,
    name         text NOT NULL DEFAULT '',
    key_hash     text NOT NULL UNIQUE,
    prefix       text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
COMMENT ON TABLE api_keys IS 'API keys (Authorization: Bearer); each maps to an owner.';
COMMENT ON COLUMN api_keys.key_hash IS 'SHA-256 of the key (keys are 256-bit random: a slow hash adds nothing).';
COMMENT ON COLUMN api_keys.prefix IS 'The first characters of the key, to recognise it in listings.';
COMMENT ON COLUMN api_keys.revoked_at IS 'Set by `stepcast keys revoke`; a revoked key authenticates nobody.';

-- Webhooks (Standard Webhooks). Each owner signs with its own secret.
CREATE TABLE IF NOT EXISTS owner_secrets (
    owner          text PRIMARY KEY,
    webhook_secret text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE owner_secrets IS 'Per-owner webhook signing secret (whsec_…), made on first use; GET /v1/me shows it.';

-- One row per (job, event) to deliver; the id is the webhook-id header.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id          uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    owner           text NOT NULL,
    event           text NOT NULL,
    url             text NOT NULL,
    status          text NOT NULL DEFAULT 'pending',
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    CONSTRAINT webhook_deliveries_status CHECK (status IN ('pending', 'delivered', 'failed')),
    CONSTRAINT webhook_deliveries_once UNIQUE (job_id, event)
);
COMMENT ON TABLE webhook_deliveries IS 'Webhook deliveries: attempts, outcome and next try (exponential back-off with jitter).';
COMMENT ON COLUMN webhook_deliveries.status IS 'pending (to send or retry), delivered (2xx), failed (refused, or out of retries).';
COMMENT ON COLUMN webhook_deliveries.next_attempt_at IS 'When to try next; a sender pushes it forward while it sends (a lease).';
COMMENT ON COLUMN webhook_deliveries.attempts IS 'Attempts begun: counted when a sender leases the row, before it sends; an outcome is recorded only by the sender of the latest one.';
CREATE INDEX IF NOT EXISTS webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';

-- Admission counts, kept as jobs come, change status and go: pending jobs per
-- queue, unfinished (pending or processing) jobs per owner. A submit sums a few
-- rows here rather than counting jobs, which grows with the queue. A count is
-- spread over 16 rows, one per writing connection (pg_backend_pid() % 16), so
-- concurrent writers seldom wait for one another's row. A job's change takes
-- its queue's row before its owner's. stepcast's statements change one job, or
-- several that move one count row: a batch's claim (jobs of one queue, whose
-- owners' counts do not move) or its completion (one statement per owner, the
-- queues' counts not moving); or insert_jobs (below), which moves its queue's
-- row first (its first job's) and then its owners' rows, holding the queue's
-- row meanwhile, so that no other statement that takes both can hold an owner's
-- row it waits for. So no two of them wait for each other in a circle.
CREATE TABLE IF NOT EXISTS job_counts (
    kind  text NOT NULL,
    key   text NOT NULL,
    shard smallint NOT NULL,
    n     bigint NOT NULL,
    PRIMARY KEY (kind, key, shard),
    CONSTRAINT job_counts_kind CHECK (kind IN ('pending', 'unfinished'))
);
COMMENT ON TABLE job_counts IS 'Pending jobs per queue, unfinished per owner: the sum of n over the shards of (kind, key).';
COMMENT ON COLUMN job_counts.key IS 'The queue (kind pending) or the owner (kind unfinished).';

CREATE OR REPLACE FUNCTION job_counts_add(counted text, counted_key text, delta int) RETURNS void AS $$
BEGIN
    INSERT INTO job_counts (kind, key, shard, n) VALUES (counted, counted_key, pg_backend_pid() % 16, delta)
    ON CONFLICT (kind, key, shard) DO UPDATE SET n = job_counts.n + EXCLUDED.n;
END $$ LANGUAGE plpgsql;  -- not SQL: PL/pgSQL keeps the statement's plan for the session

CREATE OR REPLACE FUNCTION jobs_count() RETURNS trigger AS $$
DECLARE
    was_pending    bool := TG_OP <> 'INSERT' AND OLD.status = 'pending';
    is_pending     bool := TG_OP <> 'DELETE' AND NEW.status = 'pending';
    was_unfinished bool := TG_OP <> 'INSERT' AND OLD.status IN ('pending', 'processing');
    is_unfinished  bool := TG_OP <> 'DELETE' AND NEW.status IN ('pending', 'processing');
    same_queue     bool := TG_OP = 'UPDATE' AND OLD.queue = NEW.queue;
    same_owner     bool := TG_OP = 'UPDATE' AND OLD.owner = NEW.owner;
BEGIN
    IF was_pending AND NOT (is_pending AND same_queue) THEN
        PERFORM job_counts_add('pending', OLD.queue, -1);
    END IF;
    IF is_pending AND NOT (was_pending AND same_queue) THEN
        PERFORM job_counts_add('pending', NEW.queue, 1);
    END IF;
    IF was_unfinished AND NOT (is_unfinished AND same_owner) THEN
        PERFORM job_counts_add('unfinished', OLD.owner, -1);
    END IF;
    IF is_unfinished AND NOT (was_unfinished AND same_owner) THEN
        PERFORM job_counts_add('unfinished', NEW.owner, 1);
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;

-- Counted afresh, with job writes held off meanwhile: the counts start exact
-- whatever came before (a database made by an older schema.sql).
LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE;
DELETE FROM job_counts;
INSERT INTO job_counts (kind, key, shard, n)
    SELECT 'pending', queue, 0, count(*) FROM jobs WHERE status = 'pending' GROUP BY queue;
INSERT INTO job_counts (kind, key, shard, n)
    SELECT 'unfinished', owner, 0, count(*) FROM jobs WHERE status IN ('pending', 'processing') GROUP BY owner;
DROP TRIGGER IF EXISTS jobs_count_new ON jobs;
CREATE TRIGGER jobs_count_new AFTER INSERT ON jobs
    FOR EACH ROW WHEN (NEW.status IN ('pending', 'processing')) EXECUTE FUNCTION jobs_count();
DROP TRIGGER IF EXISTS jobs_count_gone ON jobs;
CREATE TRIGGER jobs_count_gone AFTER DELETE ON jobs
    FOR EACH ROW WHEN (OLD.status IN ('pending', 'processing')) EXECUTE FUNCTION jobs_count();
DROP TRIGGER IF EXISTS jobs_count_change ON jobs;
CREATE TRIGGER jobs_count_change AFTER UPDATE OF status, queue, owner ON jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.queue <> NEW.queue OR OLD.owner <> NEW.owner)
    EXECUTE FUNCTION jobs_count();

-- A job's status change queues its webhook delivery in the same transaction,
-- whichever process made the change (worker, recovery, a cancel).
CREATE OR REPLACE FUNCTION jobs_queue_webhook() RETURNS trigger AS $$
DECLARE
    happened text := CASE NEW.status WHEN 'processing' THEN 'started' ELSE NEW.status::text END;
BEGIN
    IF NEW.webhook IS NOT NULL AND NEW.webhook -> 'events' ? happened THEN
        INSERT INTO webhook_deliveries (job_id, owner, event, url)
        VALUES (NEW.id, NEW.owner, happened, NEW.webhook ->> 'url')
        ON CONFLICT ON CONSTRAINT webhook_deliveries_once DO NOTHING;
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS jobs_queue_webhook ON jobs;
CREATE TRIGGER jobs_queue_webhook AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status AND NEW.webhook IS NOT NULL)
    EXECUTE FUNCTION jobs_queue_webhook();

-- Submits (Database.insert_jobs): admit, insert and place a list of jobs in one
-- statement. Each job, in order, goes in unless its queue holds max_pending
-- pending jobs or its owner max_unfinished unfinished ones, counting the jobs
-- before it in the list that were let in. A function so that the statement is
-- planned once per connection: as a plain prepared statement, Postgres planned
-- it afresh at every call (a custom plan for each list), which took longer than
-- running it. Replaced in place, never dropped: a dropped function would fail
-- the statements other processes have prepared against it.
CREATE OR REPLACE FUNCTION insert_jobs(
    new_ids uuid[], new_owners text[], new_params jsonb[], new_previews jsonb[], new_webhooks jsonb[],
    new_models text[], new_keys text[], new_hashes text[], new_steps integer[],
    to_queue text, version text, queue_ttl_s double precision, max_pending bigint, max_unfinished bigint
) RETURNS TABLE (ord bigint, job jobs, admission_pending bigint, admission_unfinished bigint)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH asked AS (
        SELECT * FROM unnest(new_ids, new_owners, new_params, new_previews, new_webhooks,
                             new_models, new_keys, new_hashes, new_steps)
            WITH ORDINALITY AS a(id, owner, params, preview, webhook,
                                 model_name, idempotency_key, request_hash, steps, ord)
    ), queued AS (
        SELECT coalesce(sum(n), 0)::bigint AS n FROM job_counts WHERE kind = 'pending' AND key = to_queue
    ), owners AS (
        SELECT owner, (SELECT coalesce(sum(n), 0)::bigint FROM job_counts
                       WHERE kind = 'unfinished' AND key = owner) AS n
        FROM asked GROUP BY owner
    ), ranked AS (
        -- The owner's unfinished jobs before this one: once that reaches the
        -- limit, every later job of the owner is refused too.
        SELECT asked.*, owners.n AS owner_had,
               owners.n + row_number() OVER (PARTITION BY asked.owner ORDER BY asked.ord) - 1 AS mine
        FROM asked JOIN owners USING (owner)
    ), placed AS (
        -- The queue's pending jobs before this one: the jobs before it that the
        -- owner limit let in (once the queue is full, it stays full).
        SELECT ranked.*, queued.n AS queue_had,
               queued.n + count(*) FILTER (WHERE max_unfinished IS NULL OR ranked.mine < max_unfinished) OVER (
                   ORDER BY ranked.ord ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS total
        FROM ranked, queued
    ), inserted AS (
        -- created_at a microsecond apart: the jobs keep their order in the queue.
        INSERT INTO jobs AS j (id, owner, params, preview, queue, progress_total, model_name, created_at,
                               stepcast_version, queue_expires_at, idempotency_key, request_hash, webhook)
        SELECT id, owner, params, preview, to_queue, steps, model_name,
               now() + (ord - 1) * interval '1 microsecond', version,
               CASE WHEN queue_ttl_s > 0 THEN now() + make_interval(secs => queue_ttl_s) END,
               idempotency_key, request_hash, webhook
        FROM placed
        WHERE (max_pending IS NULL OR total < max_pending) AND (max_unfinished IS NULL OR mine < max_unfinished)
        ORDER BY ord
        ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING j AS job
    )
    -- A refused job sees the counts as they stop at the limit.
    SELECT placed.ord, inserted.job,
           CASE WHEN max_pending IS NULL THEN placed.total
                ELSE least(placed.total, greatest(placed.queue_had, max_pending)) END,
           CASE WHEN max_unfinished IS NULL THEN placed.mine
                ELSE least(placed.mine, greatest(placed.owner_had, max_unfinished)) END
    FROM placed LEFT JOIN inserted ON (inserted.job).id = placed.id
    ORDER BY placed.ord;
END $$;
