"""The application's typed state, shared by the app, the pipeline and the APIs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from gateway.auth import Authenticator
    from gateway.ledger import Ledger
    from gateway.rules import Rules


@dataclass
class GatewayState:
    rules: Rules
    ledger: Ledger
    auth: Authenticator
    session: aiohttp.ClientSession
    inflight: set[asyncio.Task[web.StreamResponse]] = field(default_factory=set)


STATE = web.AppKey("gateway", GatewayState)
