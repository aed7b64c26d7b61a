-- Scheduling people can feel (docs/scheduling.md): owners take turns within a
-- queue, weighted by their key's priority class, and a job is admitted by what
-- it costs a GPU, not counted.
--
-- A job's cost is its work (megapixel-steps: width × height × steps × images)
-- times its model's measured seconds per megapixel-step, fixed when it is
-- submitted, in milliseconds of one GPU. A job's fair_tag is its virtual start
-- time (start-time fair queuing): where the job before it in its share ends
-- (fair_finish: that job's tag plus its cost over its weight), if that job is
-- still unfinished and ends later than the queue's clock; else the clock. A
-- share is an owner's, or for browser sessions (anonymous owners, made at
-- will) their address's. The queue runs jobs in (fair_tag, id) order,
-- Postgres and Redis alike: the arq score is the tag, and Postgres orders by
-- id as Redis orders equal scores by member (uuid order is the text's order).
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS fair_tag double precision;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS fair_finish double precision;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS fair_share text;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS work double precision;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS cost_ms bigint;
COMMENT ON COLUMN jobs.fair_tag IS
    'Virtual start time in its queue (ms of GPU time over weight): jobs run in (fair_tag, id) order.';
COMMENT ON COLUMN jobs.fair_finish IS 'Where its share''s next job starts while this one is unfinished: fair_tag + cost / weight.';
COMMENT ON COLUMN jobs.fair_share IS 'Whose turn it takes: its owner, or a browser session''s address (''address:'' || it).';
COMMENT ON COLUMN jobs.work IS 'Megapixel-steps asked: width × height × steps × num_images / 1e6.';
COMMENT ON COLUMN jobs.cost_ms IS 'What it asks of a GPU, in ms, at its model''s pace when submitted: the budgets'' unit.';

-- A job's work, from its params (as JobParams.megapixel_steps has it), and the
-- work left to a running one by its progress: one definition for the backfills,
-- the queues' pace, the work running and the recovery pass.
CREATE OR REPLACE FUNCTION params_work(params jsonb) RETURNS double precision
LANGUAGE sql IMMUTABLE AS $$
    SELECT (params->>'width')::double precision * (params->>'height')::double precision
           * (params->>'steps')::double precision * coalesce((params->>'num_images')::double precision, 1) / 1e6
$$;
CREATE OR REPLACE FUNCTION work_left(work double precision, step integer, total integer)
RETURNS double precision LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(work, 0) * greatest(1 - step::double precision / greatest(total, 1), 0)
$$;

-- Jobs already waiting keep their place: their arq score was their enqueue time in ms.
UPDATE jobs SET fair_tag = extract(epoch FROM created_at) * 1000, fair_finish = extract(epoch FROM created_at) * 1000,
                fair_share = coalesce('address:' || anonymous_address, owner)
WHERE status IN ('pending', 'processing') AND fair_tag IS NULL;
UPDATE jobs SET work = params_work(params) WHERE status IN ('pending', 'processing') AND work IS NULL;

-- The queue's order (positions, the work ahead of a job), and its clock.
CREATE INDEX IF NOT EXISTS jobs_fair_pending_idx ON jobs (queue, fair_tag, id) INCLUDE (work)
    WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS jobs_fair_processing_idx ON jobs (queue, fair_tag) WHERE status = 'processing';
-- Where a share's next job starts: the latest finish among its unfinished jobs (a job that
-- ends, is canceled or expires gives its turn back).
CREATE INDEX IF NOT EXISTS jobs_fair_share_idx ON jobs (queue, fair_share, fair_finish)
    WHERE status IN ('pending', 'processing');

-- A key's priority class (STEPCAST_PRIORITY_CLASSES): its owner's weight in the turns. NULL: the default.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS priority_class text;
COMMENT ON COLUMN api_keys.priority_class IS
    'The key''s priority class (a name in STEPCAST_PRIORITY_CLASSES); NULL: STEPCAST_KEY_PRIORITY_CLASS.';

-- The queue's clock: the tag of the job it serves now. The latest start among
-- the jobs running (several workers), unless a waiting job is earlier (one
-- handed back); the earliest waiting job when none runs; when the queue is
-- idle, the time now in ms (nothing waits that it could put behind).
-- (PL/pgSQL, as the helpers below: it keeps its plans for the session, where a
-- SQL function is planned again at every call. ORDER BY … LIMIT 1 rather than
-- min or max: its index is the one that gives that order, whatever the
-- planner's statistics say of a young table.)
CREATE OR REPLACE FUNCTION queue_clock(of_queue text) RETURNS double precision
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce(
        least((SELECT fair_tag FROM jobs
               WHERE queue = of_queue AND status = 'processing' AND fair_tag IS NOT NULL
               ORDER BY fair_tag DESC LIMIT 1),
              (SELECT fair_tag FROM jobs
               WHERE queue = of_queue AND status = 'pending' AND fair_tag IS NOT NULL
               ORDER BY fair_tag, id LIMIT 1)),
        extract(epoch FROM now()) * 1000
    );
END $$;

-- Where a share's next job in a queue starts: after its unfinished jobs there, not before the clock.
CREATE OR REPLACE FUNCTION share_start(of_queue text, of_share text, clock double precision)
RETURNS double precision LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN greatest(clock, (SELECT fair_finish FROM jobs
                            WHERE queue = of_queue AND fair_share = of_share
                              AND status IN ('pending', 'processing') AND fair_finish IS NOT NULL
                            ORDER BY fair_finish DESC LIMIT 1));
END $$;

-- The work left to the jobs a queue runs now (megapixel-steps, by their progress):
-- with the work waiting ahead of a job, what stands before its start.
CREATE OR REPLACE FUNCTION queue_running_work(of_queue text) RETURNS double precision
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT coalesce(sum(work_left(work, progress_step, progress_total)), 0)
            FROM jobs WHERE queue = of_queue AND status = 'processing');
END $$;

-- The admission counts carry the cost and the work too: the same rows (so the
-- same lock order, 0001), the pending jobs' per queue and the unfinished jobs'
-- per owner. A queue's pending work, less the work behind a new job (near the
-- end of a long queue: a few index entries), is the work ahead of it.
ALTER TABLE job_counts ADD COLUMN IF NOT EXISTS cost_ms bigint NOT NULL DEFAULT 0;
ALTER TABLE job_counts ADD COLUMN IF NOT EXISTS work double precision NOT NULL DEFAULT 0;
COMMENT ON COLUMN job_counts.cost_ms IS 'The summed cost_ms of the jobs counted in n (jobs from before 0007 count 0).';
COMMENT ON COLUMN job_counts.work IS 'The summed work (megapixel-steps) of the jobs counted in n.';

CREATE OR REPLACE FUNCTION job_counts_add(
    counted text, counted_key text, delta int, delta_cost bigint, delta_work double precision
) RETURNS void AS $$
BEGIN
    INSERT INTO job_counts (kind, key, shard, n, cost_ms, work)
    VALUES (counted, counted_key, pg_backend_pid() % 16, delta, delta_cost, delta_work)
    ON CONFLICT (kind, key, shard) DO UPDATE
        SET n = job_counts.n + EXCLUDED.n, cost_ms = job_counts.cost_ms + EXCLUDED.cost_ms,
            work = job_counts.work + EXCLUDED.work;
END $$ LANGUAGE plpgsql;

-- The pending jobs ahead of (tag, job_id) in a queue that holds total_n pending
-- jobs of total_work (the counts kept), and their work: counted from the head
-- when it is near the head, from the end when it is near the end (a few index
-- entries either way, for a newcomer and for a backlog's next), in full only
-- in the middle of a deep queue. (From the end, a job a server of before left
-- untagged counts as ahead, until the recovery pass tags it.)
CREATE OR REPLACE FUNCTION queue_ahead(
    of_queue text, tag double precision, job_id uuid, total_n bigint, total_work double precision,
    OUT n bigint, OUT work double precision
) LANGUAGE plpgsql STABLE AS $$
DECLARE
    near constant int := 256;
BEGIN
    SELECT count(*), coalesce(sum(p.work), 0) INTO n, work FROM (
        SELECT j.work FROM jobs j
        WHERE j.queue = of_queue AND j.status = 'pending' AND (j.fair_tag, j.id) < (tag, job_id)
        ORDER BY j.fair_tag, j.id LIMIT near
    ) p;
    IF n < near THEN
        RETURN;
    END IF;
    SELECT count(*), coalesce(sum(p.work), 0) INTO n, work FROM (
        SELECT j.work FROM jobs j
        WHERE j.queue = of_queue AND j.status = 'pending' AND (j.fair_tag, j.id) > (tag, job_id)
        ORDER BY j.fair_tag DESC, j.id DESC LIMIT near
    ) p;
    IF n < near THEN
        n := greatest(total_n - n, 0);
        work := greatest(total_work - work, 0);
        RETURN;
    END IF;
    SELECT count(*), coalesce(sum(j.work), 0) INTO n, work FROM jobs j
    WHERE j.queue = of_queue AND j.status = 'pending' AND (j.fair_tag, j.id) < (tag, job_id);
END $$;

CREATE OR REPLACE FUNCTION jobs_count() RETURNS trigger AS $$
DECLARE
    was_pending    bool := TG_OP <> 'INSERT' AND OLD.status = 'pending';
    is_pending     bool := TG_OP <> 'DELETE' AND NEW.status = 'pending';
    was_unfinished bool := TG_OP <> 'INSERT' AND OLD.status IN ('pending', 'processing');
    is_unfinished  bool := TG_OP <> 'DELETE' AND NEW.status IN ('pending', 'processing');
    same_queue     bool := TG_OP = 'UPDATE' AND OLD.queue = NEW.queue;
    same_owner     bool := TG_OP = 'UPDATE' AND OLD.owner = NEW.owner;
    old_cost       bigint := CASE WHEN TG_OP <> 'INSERT' THEN coalesce(OLD.cost_ms, 0) ELSE 0 END;
    new_cost       bigint := CASE WHEN TG_OP <> 'DELETE' THEN coalesce(NEW.cost_ms, 0) ELSE 0 END;
    old_work       double precision := CASE WHEN TG_OP <> 'INSERT' THEN coalesce(OLD.work, 0) ELSE 0 END;
    new_work       double precision := CASE WHEN TG_OP <> 'DELETE' THEN coalesce(NEW.work, 0) ELSE 0 END;
BEGIN
    IF was_pending AND NOT (is_pending AND same_queue) THEN
        PERFORM job_counts_add('pending', OLD.queue, -1, -old_cost, -old_work);
    END IF;
    IF is_pending AND NOT (was_pending AND same_queue) THEN
        PERFORM job_counts_add('pending', NEW.queue, 1, new_cost, new_work);
    END IF;
    IF was_unfinished AND NOT (is_unfinished AND same_owner) THEN
        PERFORM job_counts_add('unfinished', OLD.owner, -1, -old_cost, -old_work);
    END IF;
    IF is_unfinished AND NOT (was_unfinished AND same_owner) THEN
        PERFORM job_counts_add('unfinished', NEW.owner, 1, new_cost, new_work);
    END IF;
    -- Counted before and after in the same row, its cost or work changed (the
    -- recovery pass gives a job of a server of before its work): the difference.
    IF (old_cost <> new_cost OR old_work <> new_work) THEN
        IF was_pending AND is_pending AND same_queue THEN
            PERFORM job_counts_add('pending', NEW.queue, 0, new_cost - old_cost, new_work - old_work);
        END IF;
        IF was_unfinished AND is_unfinished AND same_owner THEN
            PERFORM job_counts_add('unfinished', NEW.owner, 0, new_cost - old_cost, new_work - old_work);
        END IF;
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS jobs_count_change ON jobs;
CREATE TRIGGER jobs_count_change AFTER UPDATE OF status, queue, owner, cost_ms, work ON jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.queue <> NEW.queue OR OLD.owner <> NEW.owner
                       OR OLD.cost_ms IS DISTINCT FROM NEW.cost_ms OR OLD.work IS DISTINCT FROM NEW.work)
    EXECUTE FUNCTION jobs_count();

-- insert_jobs (0003) with each job's work, cost and weight, the owners' cost
-- budgets and the queue's: a job goes in only if its cost fits both (counting
-- the jobs before it in the list as 0003 counts them), and gets its fair_tag.
-- A new overload beside the old ones, which older servers still call during a
-- rolling deploy (their jobs get no tag until the recovery pass gives them
-- one). Each share is locked (advisory, per queue and share, in order, after
-- the addresses'), so two submits of one share on two servers take turns
-- rather than both starting where its last job ends. Only this function takes
-- those locks, always before any count row.
CREATE OR REPLACE FUNCTION insert_jobs(
    new_ids uuid[], new_owners text[], new_params jsonb[], new_previews jsonb[], new_webhooks jsonb[],
    new_models text[], new_keys text[], new_hashes text[], new_steps integer[],
    new_addresses text[], new_max_unfinished bigint[],
    new_works double precision[], new_costs bigint[], new_weights double precision[], new_max_costs bigint[],
    to_queue text, version text, queue_ttl_s double precision, max_pending bigint, max_per_address bigint,
    max_queue_cost bigint
) RETURNS TABLE (ord bigint, job jobs, admission_pending bigint, admission_unfinished bigint,
                 admission_address bigint, admission_queue_cost bigint, admission_owner_cost bigint,
                 admission_ahead bigint, admission_work_ahead double precision,
                 admission_running_work double precision)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    clock double precision;
    running double precision;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('stepcast:address:' || address, 0))
    FROM (SELECT DISTINCT address FROM unnest(new_addresses) AS a(address)
          WHERE address IS NOT NULL ORDER BY address) locked;
    PERFORM pg_advisory_xact_lock(hashtextextended('stepcast:share:' || to_queue || ':' || share, 0))
    FROM (SELECT DISTINCT coalesce('address:' || address, owner) AS share
          FROM unnest(new_owners, new_addresses) AS o(owner, address) ORDER BY share) locked;
    clock := queue_clock(to_queue);
    running := queue_running_work(to_queue);
    RETURN QUERY
    WITH asked AS (
        SELECT * FROM unnest(new_ids, new_owners, new_params, new_previews, new_webhooks,
                             new_models, new_keys, new_hashes, new_steps, new_addresses, new_max_unfinished,
                             new_works, new_costs, new_weights, new_max_costs)
            WITH ORDINALITY AS a(id, owner, params, preview, webhook,
                                 model_name, idempotency_key, request_hash, steps, address, max_mine,
                                 work, cost, weight, max_mine_cost, ord)
    ), shared AS (
        SELECT asked.*, coalesce('address:' || asked.address, asked.owner) AS share FROM asked
    ), shares AS (
        SELECT share, share_start(to_queue, share, clock) AS start FROM (SELECT DISTINCT share FROM shared) s
    ), queued AS (
        SELECT coalesce(sum(n), 0)::bigint AS n, coalesce(sum(cost_ms), 0)::bigint AS cost,
               coalesce(sum(job_counts.work), 0)::double precision AS work
        FROM job_counts WHERE kind = 'pending' AND key = to_queue
    ), owners AS (
        SELECT o.owner, had.n, had.cost
        FROM (SELECT DISTINCT owner FROM asked) o
        CROSS JOIN LATERAL (SELECT coalesce(sum(n), 0)::bigint AS n, coalesce(sum(cost_ms), 0)::bigint AS cost
                            FROM job_counts WHERE kind = 'unfinished' AND key = o.owner) had
    ), addresses AS (
        SELECT address, (SELECT count(*) FROM jobs
                         WHERE anonymous_address = address AND status IN ('pending', 'processing')) AS n
        FROM asked WHERE address IS NOT NULL GROUP BY address
    ), ranked AS (
        -- The owner's unfinished jobs and their cost before this one: once either
        -- reaches its limit, every later job of the owner is refused too.
        SELECT shared.*, owners.n AS owner_had, coalesce(addresses.n, 0) AS address_had,
               shares.start AS share_start,
               owners.n + row_number() OVER mine - 1 AS mine,
               owners.cost + coalesce(sum(shared.cost) OVER (mine ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
                   AS mine_cost
        FROM shared JOIN owners USING (owner) JOIN shares USING (share) LEFT JOIN addresses USING (address)
        WINDOW mine AS (PARTITION BY shared.owner ORDER BY shared.ord)
    ), counted AS (
        SELECT ranked.*,
               (ranked.max_mine IS NULL OR ranked.mine < ranked.max_mine)
               AND (ranked.max_mine_cost IS NULL OR ranked.mine_cost + ranked.cost <= ranked.max_mine_cost) AS mine_ok,
               ranked.address_had + count(*) FILTER (
                   WHERE (ranked.max_mine IS NULL OR ranked.mine < ranked.max_mine)
                     AND (ranked.max_mine_cost IS NULL OR ranked.mine_cost + ranked.cost <= ranked.max_mine_cost)
               ) OVER (PARTITION BY ranked.address ORDER BY ranked.ord
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS theirs
        FROM ranked
    ), placed AS (
        -- The queue's pending jobs and their cost before this one: the jobs
        -- before it that the owner and address limits let in.
        SELECT counted.*, queued.n AS queue_had,
               queued.n + count(*) FILTER (WHERE ok) OVER prior AS total,
               queued.cost + coalesce(sum(counted.cost) FILTER (WHERE ok) OVER prior, 0) AS total_cost
        FROM (SELECT counted.*, counted.mine_ok AND (counted.address IS NULL OR max_per_address IS NULL
                                                     OR counted.theirs < max_per_address) AS ok
              FROM counted) counted, queued
        WINDOW prior AS (ORDER BY counted.ord ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
    ), admitted AS (
        SELECT placed.*,
               placed.ok AND (max_pending IS NULL OR placed.total < max_pending)
               AND (max_queue_cost IS NULL OR placed.total_cost + placed.cost <= max_queue_cost) AS admitted
        FROM placed
    ), tagged AS (
        -- Each admitted job starts where the one before it in its share ends (a
        -- cost counts at least 1 ms here: a share's jobs keep their order).
        SELECT admitted.*,
               admitted.share_start + coalesce(sum(greatest(admitted.cost, 1)::double precision / admitted.weight)
                   FILTER (WHERE admitted.admitted)
                   OVER (PARTITION BY admitted.share ORDER BY admitted.ord
                         ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS tag
        FROM admitted
    ), inserted AS (
        -- created_at a microsecond apart: the jobs keep their order in the list.
        INSERT INTO jobs AS j (id, owner, params, preview, queue, progress_total, model_name, created_at,
                               stepcast_version, queue_expires_at, idempotency_key, request_hash, webhook,
                               anonymous_address, fair_tag, fair_finish, fair_share, work, cost_ms)
        SELECT id, owner, params, preview, to_queue, steps, model_name,
               now() + (ord - 1) * interval '1 microsecond', version,
               CASE WHEN queue_ttl_s > 0 THEN now() + make_interval(secs => queue_ttl_s) END,
               idempotency_key, request_hash, webhook, address,
               tag, tag + greatest(cost, 1)::double precision / weight, share, work, cost
        FROM tagged
        WHERE admitted
        ORDER BY ord
        ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING j AS job
    )
    -- A refused job sees the counts as they stop at the limit; the costs as they are.
    SELECT tagged.ord, inserted.job,
           CASE WHEN max_pending IS NULL THEN tagged.total
                ELSE least(tagged.total, greatest(tagged.queue_had, max_pending)) END,
           CASE WHEN tagged.max_mine IS NULL THEN tagged.mine
                ELSE least(tagged.mine, greatest(tagged.owner_had, tagged.max_mine)) END,
           CASE WHEN tagged.address IS NULL THEN NULL
                WHEN max_per_address IS NULL THEN tagged.theirs
                ELSE least(tagged.theirs, greatest(tagged.address_had, max_per_address)) END,
           tagged.total_cost::bigint, tagged.mine_cost::bigint,
           coalesce(ahead.n, 0) + before.n, coalesce(ahead.work, 0) + before.work, running
    FROM tagged LEFT JOIN inserted ON (inserted.job).id = tagged.id
    -- The pending jobs ahead of an admitted one in the queue's order, and their work: those
    -- waiting (queue_ahead: from the nearer end), then those of the list.
    CROSS JOIN queued
    -- (a refused job counts nothing: the filter runs before the function)
    LEFT JOIN LATERAL (
        SELECT * FROM queue_ahead(to_queue, tagged.tag, tagged.id, queued.n, queued.work) WHERE tagged.admitted
    ) ahead ON true
    CROSS JOIN LATERAL (
        SELECT count(*) AS n, coalesce(sum(t.work), 0) AS work
        FROM tagged t JOIN inserted i ON (i.job).id = t.id
        WHERE tagged.admitted AND (t.tag, t.id) < (tagged.tag, tagged.id)
    ) before
    ORDER BY tagged.ord;
END $$;

-- The counts' costs and work, counted afresh with job writes held off (jobs from
-- before cost 0; their work was set above).
LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE;
UPDATE job_counts SET cost_ms = 0, work = 0 WHERE kind IN ('pending', 'unfinished');
INSERT INTO job_counts (kind, key, shard, n, work)
    SELECT 'pending', queue, 0, 0, sum(work) FROM jobs WHERE status = 'pending' AND work IS NOT NULL GROUP BY queue
ON CONFLICT (kind, key, shard) DO UPDATE SET work = job_counts.work + EXCLUDED.work;
INSERT INTO job_counts (kind, key, shard, n, work)
    SELECT 'unfinished', owner, 0, 0, sum(work) FROM jobs
    WHERE status IN ('pending', 'processing') AND work IS NOT NULL GROUP BY owner
ON CONFLICT (kind, key, shard) DO UPDATE SET work = job_counts.work + EXCLUDED.work;
