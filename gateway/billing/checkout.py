"""``POST /v1/billing/checkout {"pack": NAME}``: a Stripe Checkout Session for one of
rules.yaml's token packs, created with the official SDK (its aiohttp client, so the event
loop never blocks). The session carries the organization and the pack in its metadata;
the ``checkout.session.completed`` webhook credits the pack."""

from __future__ import annotations

import logging
from typing import Any

import stripe
from aiohttp import web
from stripe._http_client import AIOHTTPClient

from gateway.errors import BillingNotConfigured, GatewayError, InvalidRequest, UpstreamError
from gateway.middleware import json_body
from gateway.state import STATE

log = logging.getLogger("gateway.billing")


async def create_checkout(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    billing = state.rules.document.billing
    try:
        principal = await state.active.auth.authenticate(request.headers.get("Authorization"))
        api_key = state.environ.get(billing.api_key_env)
        if not api_key or not billing.packs:
            raise BillingNotConfigured(
                f"token packs are not for sale here: no billing.packs or no {billing.api_key_env}"
            )
        body = await json_body(request)
        name = body.get("pack")
        pack = billing.packs.get(name) if isinstance(name, str) else None
        if pack is None:
            raise InvalidRequest(f"unknown pack {name!r}; packs: {', '.join(billing.packs)}")
        org = await state.ledger.organization(principal.org)
        params: dict[str, Any] = {
            "mode": "payment",
            "line_items": [{"price": pack.price_id, "quantity": 1}],
            "success_url": billing.success_url,
            "cancel_url": billing.cancel_url,
            "client_reference_id": principal.org,
            "metadata": {"organization": principal.org, "pack": name, "user": principal.user},
        }
        if org and org.get("stripe_customer"):
            params["customer"] = org["stripe_customer"]
        http = AIOHTTPClient()
        client = stripe.StripeClient(
            api_key,
            base_addresses={"api": billing.api_base} if billing.api_base else None,
            http_client=http,
            max_network_retries=2,
        )
        try:
            session = await client.v1.checkout.sessions.create_async(params=params)  # type: ignore[arg-type]
        except stripe.StripeError as exc:
            log.error("Stripe refused a checkout for '%s': %s", principal.org, exc)
            raise UpstreamError(
                f"Stripe could not start the checkout: {exc.user_message or exc}"
            ) from exc
        finally:
            await http.close_async()  # type: ignore[no-untyped-call]
    except GatewayError as exc:
        return exc.response(instance=request.path)
    return web.json_response({"id": session.id, "url": session.url}, status=201)
