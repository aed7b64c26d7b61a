-- Many models behind one API (docs/models.md). A worker announces what it
-- serves when it starts, and renews that with its heartbeat: a row of its own
-- in `workers`, and its model's card in `models`. A worker's row lapses when
-- it is not renewed in time, or at once when its session (0004) ends; a
-- model's card stays after its last worker has gone, so that its jobs are
-- still taken (a pool scaled to zero) with its limits, until nobody has served
-- it for STEPCAST_MODEL_KEEP_DAYS.
CREATE TABLE IF NOT EXISTS models (
    name       text PRIMARY KEY,
    card       jsonb NOT NULL,
    seen_at    timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE models IS
    'Every model a worker announced: its newest card (limits, defaults, family) and when a worker last served it.';

CREATE TABLE IF NOT EXISTS workers (
    id          text PRIMARY KEY,
    model       text NOT NULL,
    session     integer,
    card        jsonb NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
COMMENT ON TABLE workers IS
    'The workers that announced themselves: live while expires_at is ahead and their session (if any) is held.';
CREATE INDEX IF NOT EXISTS workers_model_idx ON workers (model, expires_at);
