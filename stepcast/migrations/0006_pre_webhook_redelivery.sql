-- The webhook delivery log (docs/webhooks.md): an owner may ask for a
-- delivery again (POST /v1/jobs/{id}/webhooks/{delivery}/redeliver). That is
-- one more attempt than the sender gives on its own: the row's own limit,
-- attempts so far + 1. NULL: the sender's (STEPCAST_WEBHOOK_BACKOFF_S + 1).
ALTER TABLE webhook_deliveries ADD COLUMN IF NOT EXISTS attempt_limit integer;
COMMENT ON COLUMN webhook_deliveries.attempt_limit IS
    'Attempts this delivery may have in all, when it was redelivered by hand; NULL: the sender''s limit.';
