"""The service's HTTP boundary against a caller who lies: forged and replayed Toss webhooks, the
doorbell without its token, and requests that try to set an amount. Each runs on the real stack
(database with the net worker, Toss sandbox, service) and ends with the billing state as it was,
or, for amounts, with exactly the plan's price charged at Toss.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import psycopg
import pytest
from dbkit import kst
from loopkit import GOOD_CARD, Stack
from seckit import changed, contents

from service import db
from service.runtime.cluster import ADMIN_USER, Runtime

# The inbox and the audit trail record every delivery; the billing state must not move.
_INBOX = ("billing.webhook_events", "billing.events_id_seq")


@pytest.fixture
def owner(rt: Runtime, dbname: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(rt.dsn(dbname, ADMIN_USER), autocommit=True) as c:
        yield c


def billing_state(conn: psycopg.Connection[Any]) -> dict[str, str]:
    return {
        k: v
        for k, v in contents(conn).items()
        if k not in _INBOX and not k.startswith("billing_history.")
    }


def paid(stack: Stack, sub: str) -> dict[str, Any]:
    stack.register(sub)
    stack.wait(
        lambda: (
            stack.bl.scalar(
                "select count(*) from billing.payments where user_id = %s and status = 'DONE'",
                (sub,),
            )
            == 1
        ),
        "the first charge",
    )
    [entry] = [e for e in stack.ledger() if e["customerKey"] == customer_key(stack, sub)]
    with stack.toss() as toss:
        payment: dict[str, Any] = toss.get(f"/v1/payments/{entry['paymentKey']}").json()
    return payment


def customer_key(stack: Stack, sub: str) -> str:
    return str(
        stack.bl.scalar(
            "select customer_key from billing.card_registrations where user_id = %s"
            " order by created_at desc limit 1",
            (sub,),
        )
    )


def deliver(stack: Stack, body: dict[str, Any], transmission: str | None = None) -> str:
    """POST a webhook with Toss's headers; returns its transmission id."""
    transmission = transmission or f"whtrans_forged{uuid.uuid4().hex}"
    headers = {
        "tosspayments-webhook-transmission-id": transmission,
        "tosspayments-webhook-transmission-time": "2028-01-10T10:00:00+09:00",
        "tosspayments-webhook-transmission-retried-count": "0",
    }
    r = httpx.post(f"{stack.service.url}/webhooks/toss", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return transmission


def handled(stack: Stack, transmission: str) -> bool:
    """The worker has looked at the delivery (applied, ignored, or put back for a retry)."""
    row = stack.bl.one(
        "select status::text as status, attempts from billing.webhook_events"
        " where transmission_id = %s",
        (transmission,),
    )
    return row["status"] in ("processed", "ignored", "failed") or (
        row["status"] == "received" and row["attempts"] >= 1
    )


def status_changed(payment: dict[str, Any], **data: Any) -> dict[str, Any]:
    return {
        "eventType": "PAYMENT_STATUS_CHANGED",
        "createdAt": "2028-01-10T10:00:00.000000",
        "data": {**copy.deepcopy(payment), **data},
    }


def test_forged_payment_status_changed_webhooks_change_nothing(
    stack: Stack, owner: psycopg.Connection[Any]
) -> None:
    payment = paid(stack, "u1")
    total = payment["totalAmount"]
    assert (payment["status"], total) == ("DONE", 9900)
    forged = {
        "unknown paymentKey": status_changed(
            payment, paymentKey="tviva" + uuid.uuid4().hex[:20], status="DONE"
        ),
        "cancelled, says the sender": status_changed(
            payment,
            status="CANCELED",
            balanceAmount=0,
            cancels=[{"cancelAmount": total, "cancelReason": "forged", "transactionKey": "x"}],
        ),
        "partly cancelled": status_changed(payment, status="PARTIAL_CANCELED", balanceAmount=1),
        "wrong amount": status_changed(payment, totalAmount=1, balanceAmount=1),
        "aborted": status_changed(payment, status="ABORTED", failure={"code": "REJECT"}),
        "another order": status_changed(payment, orderId="order-not-ours", status="DONE"),
        "wrong secret": status_changed(payment, secret="ps_forged", status="EXPIRED"),
        "no data": {"eventType": "PAYMENT_STATUS_CHANGED", "createdAt": "2028-01-10T10:00:00"},
        "deposit callback": {
            "createdAt": "2028-01-10T10:00:00",
            "secret": "ps_forged",
            "status": "CANCELED",
            "transactionKey": "x",
            "orderId": payment["orderId"],
        },
        "billing key deleted": {
            "eventType": "BILLING_DELETED",
            "createdAt": "2028-01-10T10:00:00",
            "data": {"billingKey": "not-a-key-we-hold", "reason": "forged"},
        },
    }
    before = billing_state(owner)
    credits_before = stack.bl.api("u1", "my_credits")["balance"]
    sent = {what: deliver(stack, body) for what, body in forged.items()}
    for what, transmission in sent.items():
        stack.wait(lambda t=transmission: handled(stack, t), what)
    # A replay of a delivery already stored is a duplicate: stored once, never applied twice.
    again = deliver(stack, forged["cancelled, says the sender"], sent["cancelled, says the sender"])
    assert again == sent["cancelled, says the sender"]
    assert (
        stack.bl.scalar(
            "select count(*) from billing.webhook_events where transmission_id = %s", (again,)
        )
        == 1
    )
    assert changed(before, billing_state(owner)) == []
    assert stack.bl.api("u1", "my_credits")["balance"] == credits_before == 10
    assert stack.bl.api("u1", "my_subscription")["status"] == "active"
    # Nothing moved at Toss either: one approval, no cancel.
    assert [e["kind"] for e in stack.ledger()] == ["approval"]


def test_a_tampered_copy_of_a_genuine_webhook_is_checked_at_toss(
    stack: Stack, owner: psycopg.Connection[Any]
) -> None:
    """A refund Toss really made is applied from Toss's answer, not from what the body says."""
    payment = paid(stack, "u1")
    with stack.toss() as toss:
        r = toss.post(
            f"/v1/payments/{payment['paymentKey']}/cancel",
            json={"cancelReason": "support", "cancelAmount": 1000},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )
        assert r.status_code == 200, r.text
    # The body claims a full refund; Toss holds a partial one of 1,000.
    transmission = deliver(stack, status_changed(payment, status="CANCELED", balanceAmount=0))
    stack.wait(lambda: handled(stack, transmission), "the tampered delivery")
    row = stack.bl.one(
        "select status, balance_amount from billing.payments where payment_key = %s",
        (payment["paymentKey"],),
    )
    assert (row["status"], row["balance_amount"]) == ("PARTIAL_CANCELED", 8900)
    assert stack.bl.api("u1", "my_credits")["balance"] == 10  # credits go only on a full refund


# ------------------------------------------------------------------------------ the doorbell


def test_the_doorbell_refuses_every_token_but_its_own_and_starts_no_work(stack: Stack) -> None:
    paid(stack, "u1")
    token = stack.settings.doorbell_token.get_secret_value()
    # pg_net rings nowhere now, so only a doorbell from this test can start the renewal.
    db.run_sync(stack.bl.owner, db.ops_configure_doorbell("http://127.0.0.1:9/", token))
    stack.bl.set_clock(kst(2028, 2, 10, 10, 1))
    stack.bl.tick()
    due = "select count(*) from billing.charge_attempts where status = 'queued'"
    assert stack.bl.scalar(due) == 1
    wrong = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {token[:-1]}"},
        {"Authorization": f"Bearer {token}x"},
        {"Authorization": f"bearer {token}"},
        {"Authorization": f"Basic {token}"},
        {"Authorization": token},
        {"Authorization": f"Bearer  {token}"},
        {"X-Doorbell-Token": token},
    ]
    with httpx.Client(base_url=stack.service.url, timeout=30) as web:
        for headers in wrong:
            r = web.post("/internal/doorbell", headers=headers)
            assert (r.status_code, r.json()["code"]) == (401, "UNAUTHORIZED"), headers
            assert token not in r.text
        for method in ("GET", "PUT", "DELETE"):
            r = web.request(
                method, "/internal/doorbell", headers={"Authorization": f"Bearer {token}"}
            )
            assert r.status_code == 405, method
        assert stack.bl.scalar(due) == 1
        assert (
            web.post("/internal/doorbell", headers={"Authorization": f"Bearer {token}"}).status_code
            == 202
        )
    stack.wait(lambda: stack.bl.scalar(due) == 0, "the renewal the right token started")


# --------------------------------------------------------------------------------- amounts


def test_the_success_redirect_cannot_set_the_amount(stack: Stack) -> None:
    reg = stack.bl.api("u1", "begin_registration", "pro", claims={"email": "u1@example.com"})
    price = stack.bl.scalar(
        "select pp.amount from billing.plan_prices pp join billing.plans p on p.id = pp.plan_id"
        " where p.code = 'pro' order by pp.effective_from desc limit 1"
    )
    assert reg["amount"] == price == 9900
    with stack.toss() as toss:
        minted = toss.post(
            "/_sandbox/auth-keys",
            json={"customerKey": reg["customerKey"], "cardNumber": GOOD_CARD},
        )
        assert minted.status_code == 200, minted.text
        auth_key = minted.json()["authKey"]
    tampered = {
        "customerKey": reg["customerKey"],
        "authKey": auth_key,
        "amount": "100",
        "totalAmount": "100",
        "price": "1",
        "plan": "free",
        "orderId": "order-chosen-by-the-client",
        "orderName": "cheap",
        "currency": "USD",
    }
    with httpx.Client(timeout=60) as web:
        r = web.get(f"{stack.service.url}/billing/success", params=tampered)
    assert r.status_code == 303, r.text
    stack.wait(
        lambda: stack.bl.scalar("select count(*) from billing.payments where status = 'DONE'") == 1,
        "the first charge",
    )
    [approval] = stack.ledger()
    assert approval["amount"] == price
    assert approval["orderId"] != tampered["orderId"]
    row = stack.bl.one("select total_amount, order_id from billing.payments")
    assert (row["total_amount"], row["order_id"]) == (price, approval["orderId"])


def test_a_webhook_body_is_never_a_source_of_amounts(stack: Stack) -> None:
    """The snapshot applied is Toss's: a body's totalAmount never reaches the ledger."""
    payment = paid(stack, "u1")
    transmission = deliver(stack, status_changed(payment, totalAmount=1, balanceAmount=1))
    stack.wait(lambda: handled(stack, transmission), "the delivery")
    stored = stack.bl.one(
        "select total_amount, balance_amount from billing.payments where payment_key = %s",
        (payment["paymentKey"],),
    )
    assert (stored["total_amount"], stored["balance_amount"]) == (9900, 9900)
    # The inbox keeps what was sent (for the record); only Toss's answer was applied.
    body = stack.bl.scalar(
        "select payload from billing.webhook_events where transmission_id = %s", (transmission,)
    )
    assert body["data"]["totalAmount"] == 1


# ------------------------------------------------------------------------ the success redirect


def test_toss_is_asked_to_issue_only_for_a_registration_that_can_complete(stack: Stack) -> None:
    """Anyone can reach the success URL; a stranger's customerKey never reaches Toss."""
    reg = stack.bl.api("u1", "begin_registration", "pro", claims={"email": "u1@example.com"})
    stranger = "ck_" + uuid.uuid4().hex
    with stack.toss() as toss:
        minted = {
            ck: toss.post("/_sandbox/auth-keys", json={"customerKey": ck}).json()["authKey"]
            for ck in (stranger, reg["customerKey"])
        }
    with httpx.Client(base_url=stack.service.url, timeout=60) as web:
        unknown = web.get("/billing/success", params={"customerKey": stranger, "authKey": "x1"})
        assert (unknown.status_code, "REGISTRATION_NOT_FOUND" in unknown.text) == (404, True)
        # A stranger's genuine authKey on their own customerKey: still no registration here.
        theirs = {"customerKey": stranger, "authKey": minted[stranger]}
        assert web.get("/billing/success", params=theirs).status_code == 404
        # A made-up authKey on a real pending registration: Toss refuses it, the request's fault.
        forged = {"customerKey": reg["customerKey"], "authKey": "bln_forged"}
        refused = web.get("/billing/success", params=forged)
        assert refused.status_code == 400
        assert "INVALID_BILLING_AUTH" in refused.text
        assert stack.bl.scalar("select count(*) from billing.payment_methods") == 0
    # The stranger's authKey was never spent: Toss issues a key from it now.
    with stack.toss() as toss:
        issued = toss.post(
            "/v1/billing/authorizations/issue",
            json=theirs,
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )
        assert issued.status_code == 200, issued.text
    stack.bl.advance(timedelta(days=30))  # the pending registration expires
    with httpx.Client(base_url=stack.service.url, timeout=60) as web:
        ours = {"customerKey": reg["customerKey"], "authKey": minted[reg["customerKey"]]}
        expired = web.get("/billing/success", params=ours)
    assert (expired.status_code, "REGISTRATION_NOT_PENDING" in expired.text) == (409, True)
