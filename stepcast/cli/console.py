"""The CLI's client commands: ``generate`` with a live progress bar, ``jobs``, ``cancel``,
``models``, ``webhooks``."""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from stepcast.client import ApiError, Client, Job
from stepcast.status import Status

PARAM_OPTIONS = {
    "steps": int,
    "width": int,
    "height": int,
    "seed": int,
    "num_images": int,
    "guidance_scale": float,
    "scheduler": str,
    "negative_prompt": str,
    "model": str,
}


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    generate = commands.add_parser("generate", help="generate an image, watching every step")
    generate.add_argument("prompt")
    for name, kind in PARAM_OPTIONS.items():
        generate.add_argument("--" + name.replace("_", "-"), dest=name, type=kind)
    generate.add_argument(
        "-o", "--output", type=Path, default=Path("image.png"), help="where to save the PNG"
    )
    generate.add_argument(
        "--start-within",
        dest="start_within_s",
        type=float,
        metavar="SECONDS",
        help="queue it only if it should start within this long (else nothing is queued)",
    )
    jobs = commands.add_parser("jobs", help="your recent jobs")
    jobs.add_argument("--status", choices=[status.value for status in Status])
    jobs.add_argument("--limit", type=int, default=20)
    cancel = commands.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id")
    commands.add_parser("models", help="the models a job may name here (--model), with their workers")
    hooks = commands.add_parser("webhooks", help="a job's webhook deliveries; --redeliver ID sends one again")
    hooks.add_argument("job_id")
    hooks.add_argument("--redeliver", metavar="DELIVERY_ID", help="send this delivery again now")


def run(args: argparse.Namespace, url: str, api_key: str | None) -> int:
    err = Console(stderr=True)
    try:
        with Client(url, api_key=api_key) as client:
            if args.command == "generate":
                return _generate(client, args, err)
            if args.command == "jobs":
                _jobs(client, args)
            elif args.command == "models":
                _models(client)
            elif args.command == "webhooks":
                _webhooks(client, args)
            elif args.command == "cancel":
                job = client.cancel(args.job_id)
                print(f"{job.id} {job.status}{' (stopping at the next step)' if not job.finished else ''}")
            return 0
    except ApiError as exc:
        err.print(f"[red]error:[/red] {exc.detail}")
        for problem in exc.errors:
            err.print(f"  {problem['field']}: {problem['message']}")
        return 1
    except (OSError, httpx.TransportError) as exc:
        err.print(f"[red]error:[/red] cannot reach the server at {url} ({exc}): is `make run` up?")
        err.print("  (another server: set STEPCAST_URL, and STEPCAST_API_KEY if it asks for a key)")
        return 1


def _outputs(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(count)]


def _generate(client: Client, args: argparse.Namespace, err: Console) -> int:
    params = {name: getattr(args, name) for name in PARAM_OPTIONS if getattr(args, name) is not None}
    job = client.submit(args.prompt, start_within_s=args.start_within_s, **params)
    starts = f", starts at about {job.estimated_start_at}" if job.estimated_start_at else ""
    err.print(f"job {job.id} (seed {job.params['seed']}{starts})")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=err, transient=False) as progress:
            task = progress.add_task("queued", total=job.progress_total)
            for event in client.watch(job.id):
                data = event.data
                if event.type == "queued":
                    waiting = (
                        "waiting for a worker to start" if data.get("reason") == "no_worker" else "queued"
                    )
                    progress.update(task, description=f"{waiting}, number {data['position']}")
                elif event.type in {"started", "requeued"}:
                    progress.update(task, description="painting" if event.type == "started" else "requeued")
                elif event.type == "progress":
                    progress.update(task, completed=data["step"], description="painting")
                elif event.type == "snapshot":
                    progress.update(task, completed=data["job"]["progress"]["step"])
    except KeyboardInterrupt:
        client.cancel(job.id)
        err.print(f"canceled {job.id}")
        return 130
    done = client.get(job.id)
    return _save(client, done, args.output, err)


def _save(client: Client, job: Job, output: Path, err: Console) -> int:
    if job.status != "completed":
        reason = job.error["message"] if job.error else job.status
        err.print(f"[red]{job.status}:[/red] {reason}")
        return 1
    for image, path in zip(job.images, _outputs(output, len(job.images)), strict=True):
        path.write_bytes(client.download(image))
        print(f"{path} ({image.width}x{image.height}, seed {image.seed})")
    return 0


def _jobs(client: Client, args: argparse.Namespace) -> None:
    """One line a job, newest first: plain columns that read well and grep well."""
    page = client.list(status=args.status, limit=args.limit)
    print(f"{'ID':36}  {'STATUS':10}  {'CREATED':16}  {'STEPS':>7}  {'SIZE':>9}  PROMPT")
    for job in page.jobs:
        params = job.params
        created = job.raw["created_at"][:16].replace("T", " ")
        steps = f"{job.progress_step}/{job.progress_total}"
        size = f"{params['width']}x{params['height']}"
        print(f"{job.id:36}  {job.status:10}  {created:16}  {steps:>7}  {size:>9}  {params['prompt'][:60]}")


def _models(client: Client) -> None:
    """One line a model, the default first (marked *): what ``--model`` takes."""
    print(f"{'MODEL':24}  {'FAMILY':6}  {'WORKERS':>7}  {'WAITING':>7}  {'SIZE':>9}  {'STEPS':>5}  ETA")
    for model in client.models():
        size = model.limits["size_px"]["default"]
        eta = (
            "no worker now" if not model.workers else ("-" if model.eta_s is None else f"{model.eta_s:.1f} s")
        )
        name = model.name + (" *" if model.default else "")
        steps = model.limits["steps"]["default"]
        print(
            f"{name:24}  {model.family or '-':6}  {model.workers:>7}  {model.pending:>7}  "
            f"{f'{size}x{size}':>9}  {steps:>5}  {eta}"
        )


def _webhooks(client: Client, args: argparse.Namespace) -> None:
    """One line a delivery: what the receiver last answered, and when it is tried next."""
    if args.redeliver:
        delivery = client.redeliver(args.job_id, args.redeliver)
        print(f"{delivery['id']}  {delivery['event']}  sent again now (attempt {delivery['attempts'] + 1})")
        return
    print(f"{'DELIVERY (webhook-id)':36}  {'EVENT':9}  {'STATUS':9}  {'TRIES':>5}  {'LAST':>4}  WHEN / ERROR")
    for d in client.webhooks(args.job_id):
        when = d["delivered_at"] or d["next_attempt_at"] or ""
        last = d["last_status"] if d["last_status"] is not None else "-"
        print(
            f"{d['id']:36}  {d['event']:9}  {d['status']:9}  {d['attempts']:>5}  {last:>4}  "
            f"{when[:19].replace('T', ' ')}  {d['last_error'] or ''}".rstrip()
        )
