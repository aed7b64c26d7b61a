"""What a server process holds while it runs (pools, storage, the job service), shared by
every request handler; ``server.app`` builds it in the lifespan and closes it."""

from __future__ import annotations

from dataclasses import dataclass

from arq.connections import ArqRedis
from starlette.requests import HTTPConnection

from server.catalog import ModelCatalog
from server.hub import Subscriptions
from server.job_service import JobService
from server.limits import Sockets
from server.metrics import ServerMetrics
from server.revocations import Revocations
from stepcast.db import Database
from stepcast.events import EventLog
from stepcast.settings import ServerSettings
from stepcast.storage import Storage


@dataclass
class Services:
    settings: ServerSettings
    db: Database
    redis: ArqRedis
    events: EventLog
    storage: Storage
    hub: Subscriptions
    metrics: ServerMetrics
    session_secret: bytes
    jobs: JobService
    models: ModelCatalog
    sockets: Sockets
    # Ends the open streams of revoked API keys.
    revocations: Revocations


def services_of(connection: HTTPConnection) -> Services:
    """The process's services, which the lifespan hands every request."""
    services: Services = connection.state.services
    return services
