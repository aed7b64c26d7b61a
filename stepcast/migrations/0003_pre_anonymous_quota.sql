-- Anonymous quota (docs/configuration.md, "Anonymous sessions"). A browser
-- session's owner is made on the spot, so a script could take a new one for
-- every few jobs: an anonymous owner's job records the client address it came
-- from, and the unfinished jobs of all anonymous owners of one address are
-- capped together. Keyed owners' jobs leave it NULL.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS anonymous_address text;
COMMENT ON COLUMN jobs.anonymous_address IS
    'The client address an anonymous (browser session) owner submitted from; NULL for key holders.';
-- Counted, not kept in job_counts: an address's unfinished jobs are at most its
-- cap, so the count reads a handful of index entries, and no trigger takes one
-- more count row (and one more lock order) on every status change.
CREATE INDEX IF NOT EXISTS jobs_anonymous_unfinished_idx ON jobs (anonymous_address)
    WHERE anonymous_address IS NOT NULL AND status IN ('pending', 'processing');

-- insert_jobs (0001) with, per job, its owner's limit and its anonymous address,
-- and a cap on the unfinished jobs of each address. A new overload beside the
-- old one, which older servers still call during a rolling deploy. The
-- addresses' advisory locks, taken in order before anything is counted, make
-- concurrent submits from one address wait for each other, so that the cap is
-- exact across servers; they are the only locks this takes before the count
-- rows, and no other statement takes them.
CREATE OR REPLACE FUNCTION insert_jobs(
    new_ids uuid[], new_owners text[], new_params jsonb[], new_previews jsonb[], new_webhooks jsonb[],
    new_models text[], new_keys text[], new_hashes text[], new_steps integer[],
    new_addresses text[], new_max_unfinished bigint[],
    to_queue text, version text, queue_ttl_s double precision, max_pending bigint, max_per_address bigint
) RETURNS TABLE (ord bigint, job jobs, admission_pending bigint, admission_unfinished bigint,
                 admission_address bigint)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('stepcast:address:' || address, 0))
    FROM (SELECT DISTINCT address FROM unnest(new_addresses) AS a(address)
          WHERE address IS NOT NULL ORDER BY address) locked;
    RETURN QUERY
    WITH asked AS (
        SELECT * FROM unnest(new_ids, new_owners, new_params, new_previews, new_webhooks,
                             new_models, new_keys, new_hashes, new_steps, new_addresses, new_max_unfinished)
            WITH ORDINALITY AS a(id, owner, params, preview, webhook,
                                 model_name, idempotency_key, request_hash, steps, address, max_mine, ord)
    ), queued AS (
        SELECT coalesce(sum(n), 0)::bigint AS n FROM job_counts WHERE kind = 'pending' AND key = to_queue
    ), owners AS (
        SELECT owner, (SELECT coalesce(sum(n), 0)::bigint FROM job_counts
                       WHERE kind = 'unfinished' AND key = owner) AS n
        FROM asked GROUP BY owner
    ), addresses AS (
        SELECT address, (SELECT count(*) FROM jobs
                         WHERE anonymous_address = address AND status IN ('pending', 'processing')) AS n
        FROM asked WHERE address IS NOT NULL GROUP BY address
    ), ranked AS (
        -- The owner's unfinished jobs before this one: once that reaches the
        -- limit, every later job of the owner is refused too.
        SELECT asked.*, owners.n AS owner_had, coalesce(addresses.n, 0) AS address_had,
               owners.n + row_number() OVER (PARTITION BY asked.owner ORDER BY asked.ord) - 1 AS mine
        FROM asked JOIN owners USING (owner) LEFT JOIN addresses USING (address)
    ), counted AS (
        -- The address's unfinished jobs before this one: the jobs before it
        -- from the address that their owners' limits let in.
        SELECT ranked.*,
               ranked.address_had + count(*) FILTER (WHERE ranked.max_mine IS NULL OR ranked.mine < ranked.max_mine)
                   OVER (PARTITION BY ranked.address ORDER BY ranked.ord
                         ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS theirs
        FROM ranked
    ), placed AS (
        -- The queue's pending jobs before this one: the jobs before it that the
        -- owner and address limits let in (once the queue is full, it stays full).
        SELECT counted.*, queued.n AS queue_had,
               queued.n + count(*) FILTER (
                   WHERE (counted.max_mine IS NULL OR counted.mine < counted.max_mine)
                     AND (counted.address IS NULL OR max_per_address IS NULL OR counted.theirs < max_per_address)
               ) OVER (ORDER BY counted.ord ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS total
        FROM counted, queued
    ), inserted AS (
        -- created_at a microsecond apart: the jobs keep their order in the queue.
        INSERT INTO jobs AS j (id, owner, params, preview, queue, progress_total, model_name, created_at,
                               stepcast_version, queue_expires_at, idempotency_key, request_hash, webhook,
                               anonymous_address)
        SELECT id, owner, params, preview, to_queue, steps, model_name,
               now() + (ord - 1) * interval '1 microsecond', version,
               CASE WHEN queue_ttl_s > 0 THEN now() + make_interval(secs => queue_ttl_s) END,
               idempotency_key, request_hash, webhook, address
        FROM placed
        WHERE (max_pending IS NULL OR total < max_pending) AND (max_mine IS NULL OR mine < max_mine)
          AND (address IS NULL OR max_per_address IS NULL OR theirs < max_per_address)
        ORDER BY ord
        ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING j AS job
    )
    -- A refused job sees the counts as they stop at the limit.
    SELECT placed.ord, inserted.job,
           CASE WHEN max_pending IS NULL THEN placed.total
                ELSE least(placed.total, greatest(placed.queue_had, max_pending)) END,
           CASE WHEN placed.max_mine IS NULL THEN placed.mine
                ELSE least(placed.mine, greatest(placed.owner_had, placed.max_mine)) END,
           CASE WHEN placed.address IS NULL THEN NULL
                WHEN max_per_address IS NULL THEN placed.theirs
                ELSE least(placed.theirs, greatest(placed.address_had, max_per_address)) END
    FROM placed LEFT JOIN inserted ON (inserted.job).id = placed.id
    ORDER BY placed.ord;
END $$;
