"""The database layer on the real Postgres: a submit's one statement (admit,
insert, place), the admission counts kept as jobs change, a queue's pace (read
once an interval for every ETA), and the pool's connections, handed back
without a reset."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, cast

import asyncpg
import pytest

from server.positions import BANDS, UNKNOWN_PACE, EtaEstimator, period
from stepcast import schema
from stepcast import settings as settings_module
from stepcast.db import Completion, Database, NewJob, Pace, Place
from stepcast.status import Status
from tests.conftest import fox_params

PARAMS = fox_params(prompt="a red fox", steps=20)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    db = await Database.connect(database_url, max_size=2)
    yield db
    await db.close()


async def insert(db: Database, owner: str = "ann", queue: str = "q", **limits: Any) -> Any:
    return await db.jobs.insert(
        owner=owner, params=PARAMS, preview=None, queue=queue, model_name="tiny", version="test",
        queue_ttl_s=0, **limits,
    )  # fmt: skip


async def kept(db: Database) -> tuple[dict[str, int], dict[str, int]]:
    """The kept counts: pending jobs per queue, unfinished per owner (zeros left out)."""
    rows = await db.pool.fetch(
        "SELECT kind, key, sum(n) AS n FROM job_counts WHERE kind <> 'status' GROUP BY kind, key"
    )
    counts: dict[str, dict[str, int]] = {"pending": {}, "unfinished": {}}
    for row in rows:
        if row["n"]:
            counts[row["kind"]][row["key"]] = int(row["n"])
    return counts["pending"], counts["unfinished"]


async def counted(db: Database) -> tuple[dict[str, int], dict[str, int]]:
    """The same, counted from the jobs."""
    pending = await db.pool.fetch("SELECT queue, count(*) FROM jobs WHERE status = 'pending' GROUP BY queue")
    unfinished = await db.pool.fetch(
        "SELECT owner, count(*) FROM jobs WHERE status IN ('pending', 'processing') GROUP BY owner"
    )
    return {r[0]: r[1] for r in pending}, {r[0]: r[1] for r in unfinished}


async def test_a_submit_is_admitted_inserted_and_placed_at_once(db: Database) -> None:
    first, second = await insert(db, max_pending=2), await insert(db, owner="bob", max_pending=2)
    assert first.created and first.pending == 0 and first.unfinished == 0  # place 1
    assert second.created and second.pending == 1 and second.unfinished == 0  # place 2: bob's first
    full = await insert(db, max_pending=2)
    assert full.job is None and not full.created and full.pending == 2 and full.unfinished == 1
    # The owner's limit counts processing jobs too; another owner is not held back by it.
    await db.pool.execute("UPDATE jobs SET status = 'processing' WHERE id = $1", first.job.id)
    assert (await insert(db, max_unfinished=1)).job is None
    assert (await insert(db, owner="cy", max_unfinished=1)).created
    assert await db.pool.fetchval("SELECT count(*) FROM jobs") == 3


async def insert_all(db: Database, jobs: list[NewJob], **limits: Any) -> list[Any]:
    return await db.jobs.insert_many(jobs, queue="q", version="test", queue_ttl_s=0, **limits)


def new(owner: str, **fields: Any) -> NewJob:
    return NewJob(
        owner=owner, params=replace(PARAMS, **fields.pop("params", {})), model_name="tiny", **fields
    )


async def test_submits_inserted_together_are_admitted_and_placed_in_order(db: Database) -> None:
    await insert(db, owner="dee")
    await insert(db, owner="ann")
    await insert(db, owner="ann")  # three jobs wait already, two of them ann's
    limits = {"max_pending": 5, "max_unfinished": 3}
    batch = [new("ann"), new("ann"), new("bob"), new("cy")]
    ann, ann_over, bob, cy_over = await insert_all(db, batch, **limits)
    assert ann.created and (ann.pending, ann.unfinished) == (3, 2)  # place 4
    # ann's next is over her limit: refused, and it takes no place from bob behind it.
    assert ann_over.job is None and (ann_over.pending, ann_over.unfinished) == (4, 3)
    assert bob.created and (bob.pending, bob.unfinished) == (4, 0)  # place 5
    assert cy_over.job is None and (cy_over.pending, cy_over.unfinished) == (5, 0)  # the queue is full
    assert await kept(db) == await counted(db) == ({"q": 5}, {"dee": 1, "ann": 3, "bob": 1})
    # Owners take turns: bob (nothing waiting) starts at the queue's clock, the tag of its first
    # job (dee's and ann's first: ties go by id), ann's third after her two (docs/scheduling.md).
    ann_place, bob_place = await db.counts.place(ann.job), await db.counts.place(bob.job)
    assert ann_place.position == ann.ahead + 1 == 5
    assert bob_place.position == bob.ahead + 1 and bob_place.position <= 3


async def test_a_job_postgres_refuses_fails_alone_in_its_batch(db: Database) -> None:
    # jsonb cannot hold a NUL character (the params parser refuses one; here it gets through).
    good, bad, other = await insert_all(db, [new("ann"), new("ann", params={"prompt": "a\x00b"}), new("bob")])
    assert good.created and other.created
    assert isinstance(bad, asyncpg.UntranslatableCharacterError)
    assert await db.pool.fetchval("SELECT count(*) FROM jobs") == 2  # each good job once


async def test_a_key_repeated_in_one_batch_gives_the_first_job(db: Database) -> None:
    first, again, other = await insert_all(
        db,
        [new("ann", idempotency_key="k", request_hash="h"), new("ann", idempotency_key="k", request_hash="h"),
         new("bob", idempotency_key="k", request_hash="h")],
    )  # fmt: skip
    assert first.created and not again.created and again.job.id == first.job.id
    assert other.created and other.job.id != first.job.id
    assert await db.pool.fetchval("SELECT count(*) FROM jobs") == 2


async def test_a_failed_look_up_of_a_keys_earlier_job_fails_that_job_alone(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    await insert(db, idempotency_key="k", request_hash="h")

    async def unreachable(owner: str, key: str) -> None:
        raise ConnectionResetError("the database went away")

    monkeypatch.setattr(db.jobs, "by_idempotency_key", unreachable)
    first, again, other = await insert_all(
        db, [new("ann"), new("ann", idempotency_key="k", request_hash="h"), new("bob")]
    )
    assert first.created and other.created  # their rows are in: they must not hear otherwise
    assert isinstance(again, ConnectionResetError)


async def test_a_queues_pace_comes_from_its_recent_jobs_whatever_their_size(db: Database) -> None:
    assert await db.counts.pace("q") == Pace(megapixel_step_s=None, workers=1)  # nothing measured yet
    done, running, twice_as_wide = await insert(db), await insert(db), await insert(db)
    await db.pool.execute(
        "UPDATE jobs SET status = 'completed', worker = 'w1', run_s = 4.0, finished_at = now() WHERE id = $1",
        done.job.id,
    )
    await db.pool.execute(
        "UPDATE jobs SET status = 'processing', worker = 'w2', progress_step = 5 WHERE id = $1",
        running.job.id,
    )
    await db.pool.execute(
        "UPDATE jobs SET status = 'completed', worker = 'w1', run_s = 8.0, finished_at = now(),"
        " params = params || '{\"width\": 128}' WHERE id = $1",
        twice_as_wide.job.id,
    )
    work = PARAMS.megapixel_steps  # 64 × 64 × 20 steps
    pace = await db.counts.pace("q")
    assert pace.megapixel_step_s == pytest.approx(4.0 / work) and pace.workers == 2  # w1 lately, w2 now
    assert pace.seconds(work) == pytest.approx(4.0)
    # Three such jobs ahead, and three quarters of the running one left: on two workers.
    place = await db.counts.place((await insert(db)).job)
    assert (place.position, place.work_ahead) == (1, 0) and place.running_work == pytest.approx(work * 0.75)
    ahead = Place(4, 3 * work, place.running_work)
    assert pace.start_in_s(ahead) == pytest.approx((3 + 0.75) * 4.0 / 2)
    assert await db.counts.pace("elsewhere") == Pace(megapixel_step_s=None, workers=1)


async def test_a_pace_is_read_once_per_interval_for_everyone_who_asks(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    read = db.counts.pace

    async def counted_read(queue: str) -> Pace:
        reads.append(queue)
        return await read(queue)

    monkeypatch.setattr(db.counts, "pace", counted_read)
    eta = EtaEstimator(db, cast(Any, None), max_age_s=3600)  # (no catalog: ETAs only)
    job = (await insert(db)).job
    two_ahead = Place(3, 2 * PARAMS.megapixel_steps)
    assert (await eta.estimate(job, two_ahead)).done_in_s is None  # nothing measured yet
    await db.pool.execute(
        "UPDATE jobs SET status = 'completed', worker = 'w1', run_s = 4.0, finished_at = now() WHERE id = $1",
        job.id,
    )
    assert (await eta.estimate(job, two_ahead)).done_in_s is None  # the reading is fresh: not read again
    assert reads == ["q"]
    paces = await asyncio.gather(*(eta.pace("other") for _ in range(20)))  # submits at once
    assert reads == ["q", "other"] and len(set(paces)) == 1
    eta.max_age_s = 0  # every reading is stale from now on
    estimate = await eta.estimate(job, two_ahead)
    assert (estimate.start_in_s, estimate.done_in_s) == (pytest.approx(2 * 4.0), pytest.approx(3 * 4.0))
    assert len(reads) == 3


async def test_an_unreadable_pace_gives_no_eta(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    async def unreachable(queue: str) -> Pace:
        raise ConnectionRefusedError("Postgres is restarting")

    monkeypatch.setattr(db.counts, "pace", unreachable)
    eta = EtaEstimator(db, cast(Any, None), max_age_s=3600)  # (no catalog: ETAs only)
    assert await eta.pace("q") == UNKNOWN_PACE
    assert UNKNOWN_PACE.start_in_s(Place(5, 1.0)) is None
    assert UNKNOWN_PACE.start_in_s(Place(1, 0.0)) == 0  # nothing in the way: now, measured or not


async def test_a_key_used_before_gives_the_earlier_job(db: Database) -> None:
    first = await insert(db, idempotency_key="k", request_hash="h")
    again = await insert(db, idempotency_key="k", request_hash="h")
    assert first.created and not again.created and again.job.id == first.job.id
    assert (
        await insert(db, owner="bob", idempotency_key="k", request_hash="h")
    ).created  # keys are per owner


async def locks_held(db: Database) -> int:
    return int(
        await db.pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    )


async def test_a_singleton_lock_is_one_process_at_a_time_and_never_left_on_a_pooled_connection(
    db: Database, database_url: str
) -> None:
    other = await Database.connect(database_url, max_size=1)
    try:
        async with db.singleton("recovery") as held:
            assert held
            async with other.singleton("recovery") as also:
                assert not also
            assert await locks_held(other) == 1
        assert await locks_held(other) == 0
        with pytest.raises(RuntimeError):
            async with db.singleton("recovery") as held:
                assert held
                raise RuntimeError("the task failed")
        assert await locks_held(other) == 0
        async with other.singleton("recovery") as held:
            assert held
    finally:
        await other.close()


async def test_a_kept_lock_passes_to_a_waiting_process_the_moment_its_holder_dies(database_url: str) -> None:
    first = await Database.connect(database_url, max_size=2)
    second = await Database.connect(database_url, max_size=2)
    took_over = asyncio.Event()

    async def follow() -> None:
        async with second.leading("sessions"):
            took_over.set()

    try:
        with pytest.raises(asyncpg.InterfaceError):  # its next question, and its unlock, fail
            async with first.leading("sessions") as conn:
                follower = asyncio.create_task(follow())
                await asyncio.sleep(0.3)
                assert not took_over.is_set()  # it waits in line
                died = time.monotonic()
                conn.terminate()  # the holder's process (or its connection) is gone
                await conn.fetchval("SELECT 1")
        await asyncio.wait_for(took_over.wait(), 5)
        assert time.monotonic() - died < 1
        await follower
    finally:
        await first.close()
        await second.close()


async def test_a_close_does_not_wait_for_ever_on_a_connection_in_use(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = await Database.connect(database_url, max_size=2)
    stuck = asyncio.create_task(db.pool.fetchval("SELECT pg_sleep(60)"))
    await asyncio.sleep(0.2)  # the query is running
    started = time.monotonic()
    await db.close(timeout_s=0.5)
    assert time.monotonic() - started < 5 and db.pool.is_closing()
    assert "still in use after 0.5 s" in caplog.text
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        await stuck  # its connection was closed under it


async def test_a_batch_completes_in_one_call_each_job_fenced_by_its_attempt(db: Database) -> None:
    jobs = [(await insert(db, owner)).job for owner in ("ann", "bob", "ann")]
    claimed = await db.runs.claim(
        [job.id for job in jobs], worker="w", lease_s=30, model_revision="r", token=uuid.uuid4()
    )
    completions = [
        Completion(job.id, claimed[job.id].attempt, job.owner, {"images": [{"n": n}]}, 5 + n, 0.25, 3)
        for n, job in enumerate(jobs)
    ]
    stale = replace(completions[1], attempt=completions[1].attempt + 1)  # another attempt's
    first, fenced, third = await db.runs.complete([completions[0], stale, completions[2]])
    assert fenced is None and (await db.jobs.get(jobs[1].id)).status is Status.PROCESSING
    assert first is not None and third is not None
    assert (first.id, first.status, first.result, first.last_seq) == (
        jobs[0].id, Status.COMPLETED, {"images": [{"n": 0}]}, 5,
    )  # fmt: skip
    assert (third.id, third.result, third.last_seq) == (jobs[2].id, {"images": [{"n": 2}]}, 7)
    assert (first.pipeline_s, first.batch_size, first.progress_step) == (0.25, 3, first.progress_total)
    assert first.run_s is not None and first.queue_s is not None and first.finished_at is not None
    assert await kept(db) == await counted(db) == ({}, {"bob": 1})


async def test_admission_counts_follow_every_change_of_a_job(db: Database) -> None:
    placed = [("ann", "q"), ("ann", "q"), ("bob", "q"), ("bob", "r"), ("cy", "r")]
    jobs = [(await insert(db, owner, queue)).job for owner, queue in placed]
    assert await kept(db) == ({"q": 3, "r": 2}, {"ann": 2, "bob": 2, "cy": 1})
    claimed = await db.runs.claim(
        [jobs[0].id, jobs[3].id], worker="w", lease_s=30, model_revision="r", token=uuid.uuid4()
    )
    assert await kept(db) == ({"q": 2, "r": 1}, {"ann": 2, "bob": 2, "cy": 1})  # running is unfinished
    first, other = claimed[jobs[0].id], claimed[jobs[3].id]
    await db.runs.complete([Completion(first.id, first.attempt, "ann", {"images": []}, seq=3)])
    assert await kept(db) == ({"q": 2, "r": 1}, {"ann": 1, "bob": 2, "cy": 1})
    assert await db.runs.hand_back(other.id, other.attempt, last_seq=2) is not None  # back in the queue
    assert await kept(db) == ({"q": 2, "r": 2}, {"ann": 1, "bob": 2, "cy": 1})
    await db.jobs.finish_pending(jobs[1].id, status=Status.CANCELED, seq=2)
    await db.pool.execute("DELETE FROM jobs WHERE id = $1", jobs[4].id)
    await db.pool.execute("UPDATE jobs SET queue = 'r', owner = 'dee' WHERE id = $1", jobs[2].id)  # moved
    assert await kept(db) == await counted(db) == ({"r": 2}, {"bob": 1, "dee": 1})
    # A submit reads them: queue r holds 2 pending jobs, bob 1 unfinished one.
    refused = await insert(db, "bob", "r", max_pending=2)
    assert refused.job is None and (refused.pending, refused.unfinished) == (2, 1)


async def test_admission_counts_hold_under_concurrent_writers_and_are_counted_afresh_by_the_baseline(
    database_url: str,
) -> None:
    db = await Database.connect(database_url, max_size=8)
    try:
        inserted = await asyncio.gather(*(insert(db, f"o{i % 3}", f"q{i % 2}") for i in range(60)))
        ids = [insertion.job.id for insertion in inserted]
        batches = [ids[i : i + 4] for i in range(0, 40, 4)]
        await asyncio.gather(
            *(
                db.runs.claim(batch, worker="w", lease_s=30, model_revision="r", token=uuid.uuid4())
                for batch in batches
            ),
            *(insert(db, "o9", "q1") for _ in range(20)),
        )
        done = [Completion(i, 1, f"o{n % 3}", {"images": []}, seq=3) for n, i in enumerate(ids[:20])]
        await asyncio.gather(*(db.runs.complete(done[n : n + 4]) for n in range(0, 20, 4)))  # owners mixed
        assert await kept(db) == await counted(db)
        pending, unfinished = await kept(db)
        assert sum(pending.values()) == 60 - 40 + 20 and sum(unfinished.values()) == 60 - 20 + 20
        await db.pool.execute("UPDATE job_counts SET n = n + 7")  # drifted (a bug, an old schema)
        assert await kept(db) != await counted(db)
        await db.pool.execute("DROP TABLE schema_migrations")  # a database made by an old schema.sql
        await schema.migrate(settings_module.load(database_url=database_url))
        assert await kept(db) == await counted(db)
    finally:
        await db.close()


async def test_a_retried_claim_finds_the_jobs_its_lost_reply_started(db: Database) -> None:
    job = (await insert(db)).job
    token = uuid.uuid4()
    first = await db.runs.claim([job.id], worker="w", lease_s=30, model_revision="r", token=token)
    again = await db.runs.claim([job.id], worker="w", lease_s=30, model_revision="r", token=token)
    assert first[job.id].attempt == again[job.id].attempt == 1  # the same claim, not a second one
    assert await db.runs.claim([job.id], worker="w", lease_s=30, model_revision="r", token=uuid.uuid4()) == {}


async def test_seq_blocks_go_only_up_and_a_stale_worker_gets_none(db: Database) -> None:
    job = (await insert(db)).job
    assert job.seq_ceiling == 1024  # a new job owns 1..1024
    assert await db.seqs.reserve(job.id, 1024) == 2048
    assert await db.seqs.reserve(job.id, 1024, attempt=1) is None  # not running: no worker's block
    claimed = await db.runs.claim([job.id], worker="w", lease_s=30, model_revision="r", token=uuid.uuid4())
    assert await db.seqs.reserve(job.id, 1024, attempt=claimed[job.id].attempt) == 3072
    # A row from before seq blocks: its first block skips what the old counter may have handed out.
    await db.pool.execute("UPDATE jobs SET seq_ceiling = 0, last_seq = 30 WHERE id = $1", job.id)
    assert await db.seqs.reserve(job.id, 1024) == 30 + 2 * 1024


async def test_a_lease_that_ran_out_with_a_cancel_asked_is_never_requeued(db: Database) -> None:
    job = (await insert(db)).job
    claimed = (await db.runs.claim([job.id], worker="w", lease_s=30, model_revision="r", token=uuid.uuid4()))[
        job.id
    ]
    await db.pool.execute("UPDATE jobs SET lease_expires_at = now() - interval '1 s' WHERE id = $1", job.id)
    assert await db.jobs.request_cancel(job.id) is not None  # between recovery's read and its requeue
    assert await db.recovery.requeue_expired(job.id, claimed.attempt) is None
    done = await db.recovery.finish_expired(job.id, claimed.attempt, status=Status.CANCELED, seq=9)
    assert done is not None and (done.status, done.last_seq) == (Status.CANCELED, 9)


async def test_a_terminal_event_is_restamped_only_from_the_seq_it_had(db: Database) -> None:
    job = (await insert(db)).job
    done = await db.jobs.finish_pending(job.id, status=Status.CANCELED, seq=3)
    assert done is not None
    assert await db.seqs.restamp(job.id, 3, 8)
    assert not await db.seqs.restamp(job.id, 3, 9)  # fenced by the seq it replaces
    assert not await db.seqs.restamp(job.id, 8, 5)  # and only forward
    assert (await db.jobs.get(job.id)).last_seq == 8  # type: ignore[union-attr]


async def test_a_pass_reads_the_head_and_a_few_of_each_band_and_every_job_once_a_period(db: Database) -> None:
    inserted = await insert_all(db, [new(f"o{i}") for i in range(300)])
    # 300 owners' first jobs: all at the queue's clock, in id order (positions 1..300: bands 0..5).
    order = [
        job.id for job in sorted((insertion.job for insertion in inserted), key=lambda j: (j.fair_tag, j.id))
    ]
    other = (await insert(db, queue="r")).job  # another queue counts its own places
    reads: dict[uuid.UUID, int] = {}
    for turn in range(1, 33):  # band 5's period
        due = await db.counts.positions_due(turn, BANDS)
        for job, place in due:
            assert place.position == (1 if job.id == other.id else order.index(job.id) + 1)
            reads[job.id] = reads.get(job.id, 0) + 1
        assert all(job.status is Status.PENDING for job, _ in due)
    # Each job is read exactly once per period of its band: the head every pass, position
    # 300 once in 32; a pass reads 34 rows on average here, not 301.
    assert {job_id: 32 // period(order.index(job_id) + 1) for job_id in order} | {other.id: 32} == reads
    assert sum(reads.values()) == 32 * 10 + 4 * 160 + 140 + 32

    # The queue moves: 15 jobs start. Positions read are the new ones, in every band.
    await db.pool.execute("UPDATE jobs SET status = 'processing' WHERE id = ANY($1)", order[:15])
    waiting = order[15:]
    seen = set()
    for turn in range(33, 65):
        for job, place in await db.counts.positions_due(turn, BANDS):
            if job.id != other.id:
                assert place.position == waiting.index(job.id) + 1
                seen.add(job.id)
    assert seen == set(waiting)


async def test_a_share_gives_its_turn_back_when_its_jobs_leave_the_queue(db: Database) -> None:
    bob = (await insert_all(db, [new("bob", cost_ms=1000)]))[0].job
    await db.runs.claim([bob.id], worker="w", lease_s=60, model_revision="r", token=uuid.uuid4())
    clock = bob.fair_tag  # bob's job runs: the queue's clock is its tag
    ann = [insertion.job for insertion in await insert_all(db, [new("ann", cost_ms=1000) for _ in range(3)])]
    assert [job.fair_tag - clock for job in ann] == [0, 1000, 2000]  # her turns, a second of GPU apart
    for job in ann:  # she cancels them: they no longer hold her place
        assert await db.jobs.finish_pending(job.id, status=Status.CANCELED, seq=2) is not None
    (again,) = await insert_all(db, [new("ann", cost_ms=1000)])
    assert again.job.fair_tag == clock  # at the clock, not 3000 ms on


async def test_browser_sessions_of_one_address_share_one_turn(db: Database) -> None:
    def session(owner: str) -> NewJob:
        return new(owner, anonymous=True, address="192.0.2.7", cost_ms=1000)

    first, second = await insert_all(db, [session("anon_a"), session("anon_b")])
    (third,) = await insert_all(db, [session("anon_c")])  # a new cookie: the same address
    (key,) = await insert_all(db, [new("bob", cost_ms=1000)])
    tags = [insertion.job.fair_tag for insertion in (first, second, third, key)]
    assert [tag - tags[0] for tag in tags] == [0, 1000, 2000, 0]  # bob's owner starts at the clock


async def test_the_kept_costs_follow_jobs_through_every_change(db: Database) -> None:
    costs = [("ann", 100), ("ann", 20), ("bob", 3), ("bob", 4000)]
    jobs = [
        insertion.job for insertion in await insert_all(db, [new(owner, cost_ms=c) for owner, c in costs])
    ]
    token = uuid.uuid4()
    await db.runs.claim([jobs[0].id, jobs[2].id], worker="w", lease_s=60, model_revision="r", token=token)
    assert await db.jobs.finish_pending(jobs[1].id, status=Status.CANCELED, seq=2) is not None
    await db.pool.execute("UPDATE jobs SET status = 'completed' WHERE id = $1", jobs[2].id)
    rows = await db.pool.fetch(
        "SELECT kind, key, sum(cost_ms)::bigint AS c FROM job_counts"
        " WHERE kind <> 'status' GROUP BY kind, key"
    )
    kept = {(row["kind"], row["key"]): row["c"] for row in rows if row["c"]}
    # Pending: bob's 4000 (ann's 100 runs, her 20 was canceled, bob's 3 is done); unfinished: 100, 4000.
    assert kept == {("pending", "q"): 4000, ("unfinished", "ann"): 100, ("unfinished", "bob"): 4000}


async def test_a_new_jobs_place_is_counted_from_the_nearer_end_as_a_full_count_has_it(db: Database) -> None:
    for _ in range(8):  # ann's backlog: 800 jobs, a second of GPU each
        await insert_all(db, [new("ann", cost_ms=1000) for _ in range(100)])
    for count in (100, 99):  # cy: 199 jobs
        await insert_all(db, [new("cy", cost_ms=1000) for _ in range(count)])

    async def placed(owner: str) -> Any:
        """A new job of ``owner``, its place as its insert counted it checked by a full count."""
        (insertion,) = await insert_all(db, [new(owner, cost_ms=1000)])
        place = await db.counts.place(insertion.job)
        assert insertion.ahead + 1 == place.position
        assert insertion.work_ahead == pytest.approx(place.work_ahead)
        return insertion

    middle = await placed("cy")  # cy's 200th: about 400 ahead and 600 behind
    newcomer = await placed("bob")  # near the head
    last = await placed("ann")  # her next: at the end
    assert newcomer.ahead < 256 and last.ahead == 1001 and 256 < middle.ahead < 1001 - 256


async def test_a_job_of_a_server_of_before_is_tagged_and_its_work_counted(db: Database) -> None:
    # As an older server inserts: the 0003 overload, no tag, no work, no cost.
    await db.pool.execute(
        """
        SELECT ord FROM insert_jobs(
            ARRAY[gen_random_uuid()], ARRAY['ann'], ARRAY[$1::jsonb], ARRAY[NULL::jsonb], ARRAY[NULL::jsonb],
            ARRAY['tiny'], ARRAY[NULL::text], ARRAY[NULL::text], ARRAY[20], ARRAY[NULL::text],
            ARRAY[NULL::bigint], 'q', 'old', 0.0, NULL::bigint, NULL::bigint
        )
        """,
        PARAMS.to_json(),
    )
    await db.pool.execute("UPDATE jobs SET created_at = created_at - interval '1 minute'")
    (job,) = await db.recovery.tag_untagged(1.0)
    assert job.fair_tag is not None and job.work == pytest.approx(PARAMS.megapixel_steps)

    async def kept_work() -> dict[tuple[str, str], float]:
        rows = await db.pool.fetch(
            "SELECT kind, key, sum(work) AS w FROM job_counts WHERE kind <> 'status' GROUP BY kind, key"
        )
        return {(row["kind"], row["key"]): row["w"] for row in rows}

    work = pytest.approx(job.work)
    assert await kept_work() == {("pending", "q"): work, ("unfinished", "ann"): work}
    await db.runs.claim([job.id], worker="w", lease_s=60, model_revision="r", token=uuid.uuid4())
    await db.pool.execute("UPDATE jobs SET status = 'completed' WHERE id = $1", job.id)
    assert await kept_work() == {("pending", "q"): pytest.approx(0), ("unfinished", "ann"): pytest.approx(0)}
