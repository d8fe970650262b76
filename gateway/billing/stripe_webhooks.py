"""``POST /v1/billing/stripe/webhook``: Stripe's events, verified with the endpoint secret
by the official SDK and applied exactly once each (by event id, in the same transaction
as the change), whatever order they arrive in.

| event | effect |
|---|---|
| checkout.session.completed (paid) | the pack named in its metadata is credited |
| invoice.payment_failed | license past_due: the grace period starts |
| invoice.paid | license active: everything restored |
| customer.subscription.updated | plan set from the subscription's price (billing.plan_prices) |
| customer.subscription.deleted | plan billing.cancel_plan, license canceled |
| anything else | 200, ignored |

The organization comes from ``metadata.organization`` (set on checkout sessions and
subscriptions) or, failing that, from the Stripe customer it was linked to.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import stripe
from aiohttp import web

from gateway.errors import GatewayError
from gateway.state import STATE

log = logging.getLogger("gateway.billing")


class InvalidSignature(GatewayError):
    status = 400
    code = "invalid_signature"
    title = "Invalid webhook signature"


class BillingNotConfigured(GatewayError):
    status = 404
    code = "billing_not_configured"
    title = "Billing is not configured"


def _org_of(obj: dict[str, Any]) -> str | None:
    for holder in (obj, obj.get("subscription_details") or {}, obj.get("parent") or {}):
        metadata = holder.get("metadata") or {}
        if metadata.get("organization"):
            return str(metadata["organization"])
    return None


async def stripe_webhook(request: web.Request) -> web.Response:
    state = request.app[STATE]
    billing = state.rules.document.billing
    from gateway.app import ENVIRON

    secret = request.app[ENVIRON].get(billing.webhook_secret_env)
    try:
        if not secret:
            raise BillingNotConfigured(f"{billing.webhook_secret_env} is not set")
        payload = await request.read()
        try:
            event = stripe.Webhook.construct_event(
                payload.decode(), request.headers.get("Stripe-Signature", ""), secret
            )
        except (ValueError, stripe.SignatureVerificationError) as exc:
            raise InvalidSignature(f"the Stripe-Signature does not verify: {exc}") from exc
    except GatewayError as exc:
        log.warning("refused a Stripe webhook: %s", exc.detail)
        return exc.response(instance=request.path)

    event_type = str(event["type"])
    obj: dict[str, Any] = event["data"]["object"].to_dict()
    event_at = datetime.fromtimestamp(int(event["created"]), UTC)
    org, customer = _org_of(obj), obj.get("customer")
    apply: dict[str, Any] | None = None
    if event_type == "checkout.session.completed":
        pack = billing.packs.get(str((obj.get("metadata") or {}).get("pack", "")))
        if pack is not None and obj.get("payment_status") in ("paid", "no_payment_required"):
            apply = {"action": "purchase", "token_type": pack.token_type, "amount": pack.amount}
    elif event_type == "invoice.payment_failed":
        apply = {"action": "license", "state": "past_due"}
    elif event_type == "invoice.paid":
        apply = {"action": "license", "state": "active"}
    elif event_type == "customer.subscription.updated":
        prices = {price: plan for plan, price in billing.plan_prices.items()}
        items = (obj.get("items") or {}).get("data") or []
        plan = next((prices[i["price"]["id"]] for i in items if i["price"]["id"] in prices), None)
        if plan is not None:
            apply = {"action": "plan", "plan": plan}
    elif event_type == "customer.subscription.deleted":
        apply = {"action": "cancel", "plan": billing.cancel_plan}
    if apply is None:
        return web.json_response({"received": True, "handled": False})
    outcome = await state.ledger.stripe_apply(
        str(event["id"]),
        event_type,
        org=org,
        customer=str(customer) if customer else None,
        event_at=event_at,
        **apply,
    )
    log.info(
        "Stripe %s %s for organization %s: %s",
        event_type,
        event["id"],
        org or customer,
        outcome,
        extra={"stripe_event": event["id"], "outcome": outcome},
    )
    return web.json_response({"received": True, "handled": True, "outcome": outcome})
