"""The ``stepcast`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import asyncpg

from stepcast import liveness, logs
from stepcast import settings as settings_module
from stepcast.cli import console
from stepcast.settings import DATA_DIR, Settings, WorkerSettings

if TYPE_CHECKING:
    from stepcast.db import Database


@contextlib.asynccontextmanager
async def _embedded_postgres(settings: Settings, data_dir: Path) -> AsyncIterator[bool]:
    """From a checkout whose ``make run`` is not up, the embedded Postgres, started for the
    command (its data under ``.data/``) and stopped after; whether it was started."""
    from stepcast.cli.embedded import local_postgres
    from stepcast.cli.processes import ProcessError, port_in_use

    if (local := local_postgres(settings, data_dir)) is None or port_in_use(local[0].port):
        yield False
        return
    postgres, name = local
    print(f"(starting the embedded Postgres for this command: {postgres.data_dir})", file=sys.stderr)
    try:
        postgres.start()
        postgres.create_database(name)
    except ProcessError as exc:
        postgres.stop()
        sys.exit(f"stepcast: {exc}")
    try:
        yield True
    finally:
        postgres.stop()


def _unreachable(exc: Exception) -> NoReturn:
    sys.exit(f"stepcast: cannot reach the database (STEPCAST_DATABASE_URL): {exc}")


async def _apply_migrations(settings: Settings, *, pre_only: bool = False) -> None:
    from stepcast import schema
    from stepcast.errors import SchemaError

    try:
        applied = await schema.migrate(settings, pre_only=pre_only)
    except SchemaError as exc:
        sys.exit(f"stepcast: {exc}")
    except (OSError, asyncpg.InterfaceError, asyncpg.PostgresError) as exc:
        _unreachable(exc)
    for migration in applied:
        print(f"applied {migration.name}", file=sys.stderr)
    if not applied:
        print("nothing to apply", file=sys.stderr)


@contextlib.asynccontextmanager
async def _database(settings: Settings, data_dir: Path = DATA_DIR) -> AsyncIterator[Database]:
    """The configured database, its schema checked (migrated, when the command started the
    embedded Postgres itself)."""
    from stepcast import schema
    from stepcast.db import Database
    from stepcast.errors import SchemaError

    async with _embedded_postgres(settings, data_dir) as started:
        if started:
            await _apply_migrations(settings)
        try:
            db = await Database.connect(settings.database_url, max_size=1)
        except (OSError, asyncpg.PostgresError) as exc:
            _unreachable(exc)
        try:
            try:
                await schema.wait_until_current(db.pool, 0)
            except SchemaError as exc:
                sys.exit(f"stepcast: {exc}")
            yield db
        finally:
            await db.close()


async def _migrate(settings: Settings, *, pre_only: bool, data_dir: Path = DATA_DIR) -> None:
    async with _embedded_postgres(settings, data_dir):
        await _apply_migrations(settings, pre_only=pre_only)


async def _keys(settings: Settings, args: argparse.Namespace) -> int:
    from stepcast import credentials

    async with _database(settings) as db:
        if args.keys == "create":
            if args.priority_class is not None and args.priority_class not in settings.priority_classes:
                known = ", ".join(sorted(settings.priority_classes))
                sys.exit(
                    f"stepcast: no priority class {args.priority_class!r} "
                    f"(STEPCAST_PRIORITY_CLASSES: {known})"
                )
            key = credentials.new_key()
            owner = args.owner or credentials.new_owner("user")
            key_id = await db.owners.create_api_key(
                owner=owner,
                name=args.name,
                key_hash=credentials.hash_key(key),
                prefix=key[: credentials.SHOWN_PREFIX_CHARS],
                priority_class=args.priority_class,
            )
            priority_class = args.priority_class or f"{settings.key_priority_class} (the default)"
            print(f"key id  {key_id}\nowner   {owner}\nclass   {priority_class}\nkey     {key}")
            print("(the key is shown only now: keep it; stepcast stores a hash of it)", file=sys.stderr)
        elif args.keys == "revoke":
            try:
                key_id = uuid.UUID(args.key_id)
            except ValueError:
                sys.exit(f"stepcast: {args.key_id!r} is not a key id (see `stepcast keys list`)")
            if not await db.owners.revoke_api_key(key_id):
                sys.exit(f"stepcast: no active key {key_id}")
            print(f"revoked {key_id}")
        else:
            for row in await db.owners.api_keys():
                state = f"revoked {row['revoked_at']:%Y-%m-%d}" if row["revoked_at"] else "active"
                priority_class = row["priority_class"] or settings.key_priority_class
                label = row["name"] or "-"
                print(f"{row['id']}  {row['prefix']}…  {row['owner']}  {label}  {priority_class}  {state}")
    return 0


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive count")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stepcast", description="Serve slow generative models.")
    commands = parser.add_subparsers(dest="command", required=True)
    run_command = commands.add_parser(
        "run", help="Postgres, Redis, the server and workers, kept running on this machine"
    )
    run_command.add_argument(
        "--workers", type=_count, help="worker processes (default: STEPCAST_WORKERS or one per GPU)"
    )
    run_command.add_argument(
        "--data-dir",
        type=Path,
        default=DATA_DIR,
        help="where Postgres and Redis keep their data (default: .data)",
    )
    commands.add_parser("serve", help="the API server")
    commands.add_parser("worker", help="a GPU worker")
    migrate = commands.add_parser(
        "migrate", help="apply the schema migrations the configured database lacks (docs/migrations.md)"
    )
    migrate.add_argument(
        "--pre",
        action="store_true",
        help="only the pre steps, which the running version also works with (before a rolling update)",
    )
    tiny = commands.add_parser("tiny-model", help="build the tiny random-weight model")
    tiny.add_argument("--force", action="store_true", help="rebuild even if present")
    alive = commands.add_parser(
        "worker-alive", help="exit 0 if the worker's heartbeat is fresh (a liveness probe)"
    )
    alive.add_argument("--max-age", type=float, default=30.0, help="seconds (default 30)")
    key_commands = commands.add_parser("keys", help="API keys").add_subparsers(dest="keys", required=True)
    create = key_commands.add_parser("create", help="make a key (shown once)")
    create.add_argument("--owner", help="the owner the key acts for (default: a new one)")
    create.add_argument("--name", default="", help="a label to recognise it by")
    create.add_argument(
        "--class",
        dest="priority_class",
        help="its priority class, a name in STEPCAST_PRIORITY_CLASSES (default: STEPCAST_KEY_PRIORITY_CLASS)",
    )
    revoke = key_commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    key_commands.add_parser("list", help="every key (never the key itself)")
    console.add_commands(commands)
    args = parser.parse_args(argv)

    # The server and the worker load their own role's settings; the commands below, every setting.
    if args.command == "serve":
        from server.app import main as serve

        serve()
        return 0
    if args.command == "worker":
        from gpu_worker.worker import main as work

        work()
        return 0
    if args.command in {"worker-alive", "tiny-model"}:
        return _on_a_worker(args, settings_module.load_or_exit(WorkerSettings))

    settings = settings_module.load_or_exit(Settings)
    client_side = args.command in {"generate", "jobs", "cancel", "models", "webhooks", "keys"}
    # A client command talks to a terminal, not a log pipeline.
    logs.configure("WARNING" if client_side else settings.log_level, settings.log_format)

    if args.command in {"generate", "jobs", "cancel", "models", "webhooks"}:
        api_key = settings.api_key.get_secret_value() if settings.api_key else None
        return console.run(args, settings.url, api_key)
    if args.command == "keys":
        return asyncio.run(_keys(settings, args))
    if args.command == "run":
        from stepcast.cli.embedded import run

        return run(settings, workers=args.workers, data_dir=args.data_dir)
    if args.command == "migrate":
        asyncio.run(_migrate(settings, pre_only=args.pre))
    return 0


def _on_a_worker(args: argparse.Namespace, settings: WorkerSettings) -> int:
    """``worker-alive`` (a worker's liveness probe) and ``tiny-model``."""
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "worker-alive":
        if settings.worker_alive_file is None:
            sys.exit("stepcast: set STEPCAST_WORKER_ALIVE_FILE (the worker touches it on every heartbeat)")
        if not liveness.alive(settings.worker_alive_file, args.max_age):
            sys.exit(f"stepcast: no heartbeat in {settings.worker_alive_file} for {args.max_age:g} s")
    elif args.command == "tiny-model":
        from gpu_worker.tiny_model import TINY, build, ensure

        logs.quiet_libraries()
        model_dir = Path(settings.model_dir)
        shape = settings.model_name if settings.model_name in TINY else "tiny"
        print(build(model_dir, shape=shape) if args.force else ensure(model_dir, shape))
    return 0
