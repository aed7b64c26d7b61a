"""The ``stepcast`` command."""

from __future__ import annotations

import argparse
import asyncio
import sys

from stepcast import console, liveness, logs
from stepcast import settings as settings_module
from stepcast.settings import Settings


async def _migrate(settings: Settings) -> None:
    from stepcast.db import Database

    db = await Database.connect(settings.database_url, max_size=1)
    try:
        await db.migrate()
    finally:
        await db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stepcast", description="Serve slow generative models.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="Postgres, Redis, the server and a worker, all on this machine")
    commands.add_parser("serve", help="the API server")
    commands.add_parser("worker", help="a GPU worker")
    commands.add_parser("migrate", help="apply schema.sql to the configured database")
    tiny = commands.add_parser("tiny-model", help="build the tiny random-weight model")
    tiny.add_argument("--force", action="store_true", help="rebuild even if present")
    alive = commands.add_parser(
        "worker-alive", help="exit 0 if the worker's heartbeat is fresh (a liveness probe)"
    )
    alive.add_argument("--max-age", type=float, default=30.0, help="seconds (default 30)")
    console.add_commands(commands)
    args = parser.parse_args(argv)

    settings = settings_module.load_or_exit()
    logs.configure(settings.log_level)

    if args.command in {"generate", "jobs", "cancel"}:
        return console.run(args, settings.url)
    if args.command == "run":
        from stepcast.embedded import run

        return run(settings)
    if args.command == "serve":
        from server.app import main as serve

        serve()
    elif args.command == "worker":
        from gpu_worker.worker import main as work

        work()
    elif args.command == "migrate":
        asyncio.run(_migrate(settings))
    elif args.command == "worker-alive":
        if settings.worker_alive_file is None:
            sys.exit("stepcast: set STEPCAST_WORKER_ALIVE_FILE (the worker touches it on every heartbeat)")
        if not liveness.alive(settings.worker_alive_file, args.max_age):
            sys.exit(f"stepcast: no heartbeat in {settings.worker_alive_file} for {args.max_age:g} s")
    elif args.command == "tiny-model":
        from gpu_worker.tiny_model import build, ensure

        print(build(settings.model_dir) if args.force else ensure(settings.model_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
