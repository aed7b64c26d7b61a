-- Each model's jobs wait in a queue of their own (docs/models.md): a job's
-- queue is "<STEPCAST_QUEUE_NAME>:<model>", where it was STEPCAST_QUEUE_NAME
-- alone. Jobs left pending on the old queue, once no older worker remains to
-- take them from it, move to their model's: the recovery pass then finds them
-- missing from that queue in Redis and enqueues them there (within
-- STEPCAST_ENQUEUE_GRACE_S). A post step: while older servers run, they keep
-- putting jobs on the old queue, and older workers keep taking them.
UPDATE jobs SET queue = queue || ':' || model_name
WHERE status = 'pending' AND right(queue, length(model_name) + 1) <> ':' || model_name;
