"""Who is asking. Every job has an owner; until API keys and browser sessions
exist, every request belongs to the configured anonymous owner."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from server.services import Services


def owner_of(connection: HTTPConnection) -> str:
    services: Services = connection.state.services
    return services.settings.anonymous_owner
