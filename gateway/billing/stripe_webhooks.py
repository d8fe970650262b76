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
| charge.refunded | the pack it paid for loses the share refunded |
| charge.dispute.created | the pack it paid for loses the share disputed |
| charge.dispute.closed (won), charge.dispute.funds_reinstated | the pack gets that share back |
| anything else | 200, ignored |

The organization comes from ``metadata.organization`` (the gateway writes it into every
checkout session; operators put it on subscriptions) or, failing that, from the Stripe
customer bound to it. A customer is bound to the first organization it pays for and never
moved. License events are ordered among themselves, plan events among themselves: an event
older than the last of its kind applied is ignored (``stale``).

Refusals, each answered problem+json without recording the event, so that Stripe's retry
applies it: 400 ``invalid_signature``, 400 ``invalid_request`` (signed, but not an event
this handler can read), 403 ``unknown_organization`` (a paid pack for an organization that
does not exist yet), 503 ``ledger_unavailable``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, overload

import stripe
from aiohttp import web

from gateway.errors import (
    BillingNotConfigured,
    GatewayError,
    InvalidRequest,
    InvalidSignature,
    UnknownOrganization,
)
from gateway.rules import BillingConfig
from gateway.state import STATE

log = logging.getLogger("gateway.billing")


@dataclass(frozen=True)
class StripeEvent:
    id: str
    type: str
    created: datetime
    object: dict[str, Any]


def parse_event(payload: bytes) -> StripeEvent:
    """The event in a verified body. Raises ``InvalidRequest`` naming the first field that
    is missing or of the wrong type."""
    try:
        raw = json.loads(payload)
    except ValueError as exc:
        raise InvalidRequest(f"the body is not JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise InvalidRequest(f"the body must be an object, not {_kind(raw)}")
    event_id = _text(raw, "id", "", required=True)
    event_type = _text(raw, "type", "", required=True)
    created = _count(raw, "created", "", required=True)
    try:
        at = datetime.fromtimestamp(created, UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise InvalidRequest(f"created: {created} is not a time") from exc
    data = _object(raw, "data", "", required=True)
    obj = _object(data, "object", "data.", required=True)
    return StripeEvent(str(event_id), str(event_type), at, obj)


# -- reading fields: each names its path when it refuses -------------------------------


def _kind(value: Any) -> str:
    """What a JSON value is, for a refusal: a container by its kind, a scalar as itself."""
    if isinstance(value, dict | list):
        return "an object" if isinstance(value, dict) else "an array"
    return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


def _object(obj: dict[str, Any], key: str, at: str, *, required: bool = False) -> dict[str, Any]:
    value = obj.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{at}{key}: must be an object, not {_kind(value)}")
    return value


def _text(obj: dict[str, Any], key: str, at: str, *, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{at}{key}: must be a non-empty string, not {_kind(value)}")
    return value


def _ref(obj: dict[str, Any], key: str, at: str) -> str | None:
    """The id of another Stripe object, given as its id or expanded."""
    if isinstance(obj.get(key), dict):
        return _text(obj[key], "id", f"{at}{key}.", required=True)
    return _text(obj, key, at)


@overload
def _count(obj: dict[str, Any], key: str, at: str, *, required: Literal[True]) -> int: ...
@overload
def _count(obj: dict[str, Any], key: str, at: str, *, required: bool = False) -> int | None: ...
def _count(obj: dict[str, Any], key: str, at: str, *, required: bool = False) -> int | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"{at}{key}: must be a non-negative integer, not {_kind(value)}")
    return value


def _org_of(obj: dict[str, Any]) -> str | None:
    """metadata.organization of the object, or of the subscription an invoice is for."""
    parent = _object(obj, "parent", "data.object.")
    holders = (
        ("data.object.", obj),
        ("data.object.subscription_details.", _object(obj, "subscription_details", "data.object.")),
        ("data.object.parent.", parent),
        (
            "data.object.parent.subscription_details.",
            _object(parent, "subscription_details", "data.object.parent."),
        ),
    )
    for at, holder in holders:
        org = _text(_object(holder, "metadata", at), "organization", f"{at}metadata.")
        if org:
            return org
    return None


# -- the handler -----------------------------------------------------------------------


async def stripe_webhook(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    billing = state.rules.document.billing
    secret = state.environ.get(billing.webhook_secret_env)
    try:
        if not secret:
            raise BillingNotConfigured(f"{billing.webhook_secret_env} is not set")
        payload = await request.read()
        try:
            stripe.WebhookSignature.verify_header(
                payload,
                request.headers.get("Stripe-Signature", ""),
                secret,
                stripe.Webhook.DEFAULT_TOLERANCE,
            )
        except (ValueError, stripe.SignatureVerificationError) as exc:
            raise InvalidSignature(f"the Stripe-Signature does not verify: {exc}") from exc
        try:
            event = parse_event(payload)
        except InvalidRequest as exc:
            raise InvalidRequest(f"Stripe event: {exc.detail}") from exc
        try:
            return await _apply(request, event, billing)
        except InvalidRequest as exc:
            raise InvalidRequest(f"Stripe event {event.id} ({event.type}): {exc.detail}") from exc
    except GatewayError as exc:
        log.warning("refused a Stripe webhook: %s", exc.detail)
        return exc.response(instance=request.path)


# Events that take a pack back (refunds, disputes) or give it back (a dispute won).
_REVERSALS = frozenset(
    {
        "charge.refunded",
        "charge.dispute.created",
        "charge.dispute.closed",
        "charge.dispute.funds_reinstated",
    }
)


async def _apply(request: web.Request, event: StripeEvent, billing: BillingConfig) -> web.Response:
    ledger = request.config_dict[STATE].ledger
    obj, at = event.object, "data.object."
    if event.type in _REVERSALS:
        dispute, won = None, False
        if event.type == "charge.refunded":
            paid = _count(obj, "amount", at, required=True)
            refunded = _count(obj, "amount_refunded", at, required=True)
            if refunded is not None and paid is not None and refunded > paid:
                raise InvalidRequest(f"{at}amount_refunded: {refunded} is over amount {paid}")
            charge, disputed = _text(obj, "id", at), None
        else:
            disputed = _count(obj, "amount", at, required=True)
            charge, paid, refunded = _ref(obj, "charge", at), None, None
            dispute = _text(obj, "id", at, required=True)
            won = event.type == "charge.dispute.funds_reinstated" or (
                event.type == "charge.dispute.closed" and _text(obj, "status", at) == "won"
            )
        reversal = await ledger.stripe_reverse(
            event.id,
            event.type,
            payment_intent=_ref(obj, "payment_intent", at),
            charge=charge,
            paid=paid,
            refunded=refunded,
            disputed=disputed,
            dispute=dispute,
            won=won,
        )
        outcome = str(reversal["status"])
        _log(event, reversal["org"] or charge, outcome)
        if reversal["unbilled"]:
            log.warning(
                "Stripe %s %s: organization '%s' had already spent %s %s tokens of the pack "
                "paid by charge %s; only %s were taken back, the rest is recorded as unbilled "
                "in stripe_clawbacks",
                event.type,
                event.id,
                reversal["org"],
                reversal["unbilled"],
                reversal["token_type"],
                charge,
                reversal["taken"],
                extra={"stripe_event": event.id, "outcome": outcome},
            )
        return web.json_response({"received": True, "handled": True, "outcome": outcome})

    metadata_org, customer = _org_of(obj), _ref(obj, "customer", at)
    apply: dict[str, Any] | None = None
    if event.type == "checkout.session.completed":
        metadata = _object(obj, "metadata", at)
        name = _text(metadata, "pack", f"{at}metadata.")
        pack = billing.packs.get(name) if name else None
        payment_status = _text(obj, "payment_status", at)
        payment_intent, paid = _ref(obj, "payment_intent", at), _count(obj, "amount_total", at)
        if name and pack is None:
            log.error(
                "Stripe %s %s names pack '%s', which rules.yaml does not have: not credited",
                event.type,
                event.id,
                name,
            )
        if pack is not None and payment_status in ("paid", "no_payment_required"):
            apply = {
                "action": "purchase",
                "token_type": pack.token_type,
                "amount": pack.amount,
                "payment_intent": payment_intent,
                "paid": paid,
            }
    elif event.type == "invoice.payment_failed":
        apply = {"action": "license", "state": "past_due"}
    elif event.type == "invoice.paid":
        apply = {"action": "license", "state": "active"}
    elif event.type == "customer.subscription.updated":
        prices = {price: plan for plan, price in billing.plan_prices.items()}
        items = _object(obj, "items", at).get("data") or []
        if not isinstance(items, list):
            raise InvalidRequest(f"{at}items.data: must be an array, not {_kind(items)}")
        for i, item in enumerate(items):
            where = f"{at}items.data[{i}]."
            if not isinstance(item, dict):
                raise InvalidRequest(f"{where[:-1]}: must be an object, not {_kind(item)}")
            price = _text(_object(item, "price", where, required=True), "id", f"{where}price.")
            if price in prices and apply is None:
                apply = {"action": "plan", "plan": prices[price]}
    elif event.type == "customer.subscription.deleted":
        apply = {"action": "cancel", "plan": billing.cancel_plan}
    if apply is None:
        return web.json_response({"received": True, "handled": False})

    result = await ledger.stripe_apply(
        event.id,
        event.type,
        org=metadata_org,
        customer=customer,
        event_at=event.created,
        **apply,
    )
    outcome, org = str(result["status"]), result["org"]
    if outcome == "unknown_organization" and apply["action"] == "purchase":
        who = (
            f"organization '{metadata_org}' does not exist (yet)"
            if metadata_org
            else f"no organization is named in its metadata or bound to customer {customer}"
        )
        raise UnknownOrganization(
            f"{event.type} {event.id}: {who}; the pack is credited when Stripe retries this "
            "event after the organization is created",
            event=event.id,
        )
    if result["customer_org"] not in (None, org):
        log.warning(
            "Stripe %s %s: applied to organization '%s' named in its metadata, but customer %s "
            "belongs to organization '%s' and stays bound to it",
            event.type,
            event.id,
            org,
            customer,
            result["customer_org"],
            extra={"stripe_event": event.id, "outcome": outcome},
        )
    _log(event, org or customer, outcome)
    return web.json_response({"received": True, "handled": True, "outcome": outcome})


def _log(event: StripeEvent, who: str | None, outcome: str) -> None:
    log.info(
        "Stripe %s %s for organization %s: %s",
        event.type,
        event.id,
        who,
        outcome,
        extra={"stripe_event": event.id, "outcome": outcome},
    )
