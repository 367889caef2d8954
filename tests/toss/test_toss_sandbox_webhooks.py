"""Webhooks: Toss's bodies and headers, delivery, and the retry schedule on the sandbox clock."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import timedelta

import httpx
import pytest
from sandbox_harness import (
    CUSTOMER_KEY,
    SECRET_KEY,
    START,
    LiveServer,
    WebhookSink,
    charge,
    new_billing_key,
    wait_until,
)

from service.sandbox.clock import toss_time
from service.toss import TossClient

HOOK_URL = "http://merchant.test/webhooks/toss"
CREATED_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}")  # no offset


@pytest.fixture
def hooked(control: httpx.Client) -> httpx.Client:
    assert control.put("/_sandbox/webhook", json={"url": HOOK_URL}).json() == {"url": HOOK_URL}
    return control


def _received(sink: WebhookSink, count: int) -> list[httpx.Request]:
    wait_until(lambda: len(sink.received) >= count, f"{count} webhook deliveries")
    return list(sink.received)


def test_cancel_sends_payment_status_changed(
    api: httpx.Client, hooked: httpx.Client, webhook_sink: WebhookSink
) -> None:
    payment = charge(api, new_billing_key(api, hooked), "order-hook-1", 10000).json()
    hooked.post("/_sandbox/clock/advance", json={"seconds": 30})
    canceled = api.post(
        f"/v1/payments/{payment['paymentKey']}/cancel",
        json={"cancelReason": "환불", "cancelAmount": 4000},
    ).json()
    (request,) = _received(webhook_sink, 1)
    assert request.method == "POST"
    assert str(request.url) == HOOK_URL
    assert request.headers["content-type"] == "application/json"
    assert request.headers["tosspayments-webhook-transmission-time"] == (
        "2025-03-01T10:00:30+09:00"
    )
    assert request.headers["tosspayments-webhook-transmission-retried-count"] == "0"
    assert re.fullmatch(
        r"whtrans_a01[a-z0-9]{24}", request.headers["tosspayments-webhook-transmission-id"]
    )
    assert "tosspayments-webhook-signature" not in request.headers
    # Success means HTTP 200 within 10 s: the delivery gives up reading after 10 s.
    assert request.extensions["timeout"] == {
        "connect": 10.0,
        "read": 10.0,
        "write": 10.0,
        "pool": 10.0,
    }
    body = json.loads(request.content)
    assert set(body) == {"eventType", "createdAt", "data"}
    assert body["eventType"] == "PAYMENT_STATUS_CHANGED"
    assert body["createdAt"] == "2025-03-01T10:00:30.000000"
    assert CREATED_AT.fullmatch(body["createdAt"])
    assert body["data"] == canceled
    assert body["data"]["status"] == "PARTIAL_CANCELED"
    assert body["data"]["secret"] == payment["secret"]


def test_delete_sends_billing_deleted(
    api: httpx.Client, hooked: httpx.Client, webhook_sink: WebhookSink
) -> None:
    billing_key = new_billing_key(api, hooked)
    api.delete(f"/v1/billing/{billing_key}")
    (request,) = _received(webhook_sink, 1)
    assert request.headers["tosspayments-webhook-transmission-retried-count"] == "0"
    assert "tosspayments-webhook-signature" not in request.headers
    body = json.loads(request.content)
    assert body == {
        "eventType": "BILLING_DELETED",
        "createdAt": "2025-03-01T10:00:00.000000",
        "data": {"billingKey": billing_key, "reason": "삭제 API 요청"},
    }


def test_full_cancel_sends_canceled(
    api: httpx.Client, hooked: httpx.Client, webhook_sink: WebhookSink
) -> None:
    payment = charge(api, new_billing_key(api, hooked), "order-hook-2", 10000).json()
    api.post(f"/v1/payments/{payment['paymentKey']}/cancel", json={"cancelReason": "해지"})
    (request,) = _received(webhook_sink, 1)
    body = json.loads(request.content)
    assert body["eventType"] == "PAYMENT_STATUS_CHANGED"
    assert (body["data"]["status"], body["data"]["balanceAmount"]) == ("CANCELED", 0)
    assert body["data"]["paymentKey"] == payment["paymentKey"]


def _statuses(control: httpx.Client) -> list[str]:
    deliveries = control.get("/_sandbox/webhooks").json()["deliveries"]
    return [json.loads(d["body"])["data"]["status"] for d in deliveries]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("option", "expected"),
    [
        # The documented minimum: only when the status changes. The second partial cancel and
        # the last one (balance 0, status stays PARTIAL_CANCELED) change nothing.
        ({}, ["PARTIAL_CANCELED"]),
        ({"cancel_webhooks": "status_change"}, ["PARTIAL_CANCELED"]),
        ({"cancel_webhooks": "every_cancel"}, ["PARTIAL_CANCELED"] * 3),
        ({"cancel_webhooks": "none"}, []),
    ],
)
async def test_cancel_webhooks_switch_and_refunds_need_none(
    start_sandbox: Callable[..., LiveServer], option: dict[str, str], expected: list[str]
) -> None:
    server = start_sandbox(webhook_url=None, **option)
    async with (
        TossClient(SECRET_KEY, base_url=server.url) as toss,
        httpx.AsyncClient(base_url=server.url) as acontrol,
    ):
        body = {"customerKey": CUSTOMER_KEY}
        auth_key = (await acontrol.post("/_sandbox/auth-keys", json=body)).json()["authKey"]
        billing = await toss.issue_billing_key(auth_key, CUSTOMER_KEY, idempotency_key="reg")
        paid = await toss.charge(
            billing.billing_key, CUSTOMER_KEY, 9000, "order-hooks-1", "Pro", idempotency_key="c"
        )
        refunds = [
            await toss.cancel(paid.payment_key, "환불", 3000, idempotency_key=f"r-{i}")
            for i in range(3)
        ]
        with httpx.Client(base_url=server.url) as control:
            assert _statuses(control) == expected
    # Refund sync reads the cancel's own answer: each refund is there, webhook or not.
    assert [r.balance_amount for r in refunds] == [6000, 3000, 0]
    assert [len(r.cancels) for r in refunds] == [1, 2, 3]
    assert [r.cancels[-1].cancel_amount for r in refunds] == [3000] * 3
    assert {r.status for r in refunds} == {"PARTIAL_CANCELED"}


def test_full_cancel_after_a_partial_one_sends_nothing_by_default(
    api: httpx.Client, hooked: httpx.Client, webhook_sink: WebhookSink
) -> None:
    payment = charge(api, new_billing_key(api, hooked), "order-hook-3", 10000).json()
    path = f"/v1/payments/{payment['paymentKey']}/cancel"
    api.post(path, json={"cancelReason": "부분", "cancelAmount": 1000})
    rest = api.post(path, json={"cancelReason": "나머지"}).json()
    assert (rest["status"], rest["balanceAmount"]) == ("PARTIAL_CANCELED", 0)
    hooked.post("/_sandbox/webhooks/flush")
    assert _statuses(hooked) == ["PARTIAL_CANCELED"]


def test_failed_deliveries_follow_the_retry_schedule(
    server: LiveServer, api: httpx.Client, hooked: httpx.Client, webhook_sink: WebhookSink
) -> None:
    webhook_sink.answers.extend([500, 503, httpx.ReadTimeout, 404, 500, 500, 500, 500])
    api.delete(f"/v1/billing/{new_billing_key(api, hooked)}")
    _received(webhook_sink, 1)
    hooked.post("/_sandbox/webhooks/flush")  # waits for a delivery still under way

    for interval in (1, 4, 16, 64, 256, 1024, 4096):
        early = hooked.post("/_sandbox/clock/advance", json={"minutes": interval - 1}).json()
        assert early["delivered"] == []
        due = hooked.post("/_sandbox/clock/advance", json={"minutes": 1}).json()
        assert len(due["delivered"]) == 1
    assert hooked.post("/_sandbox/clock/advance", json={"days": 30}).json()["delivered"] == []

    (delivery,) = hooked.get("/_sandbox/webhooks").json()["deliveries"]
    assert delivery["state"] == "failed"
    offsets = [0, 1, 5, 21, 85, 341, 1365, 5461]  # minutes after the event: ~3 days 19 hours
    assert [a["at"] for a in delivery["attempts"]] == [
        toss_time(START + timedelta(minutes=m)) for m in offsets
    ]
    assert [a["retriedCount"] for a in delivery["attempts"]] == list(range(8))
    assert [a["status"] for a in delivery["attempts"]] == [500, 503, None, 404, 500, 500, 500, 500]
    assert delivery["attempts"][2]["error"] == "ReadTimeout"
    received = webhook_sink.received
    ids = {r.headers["tosspayments-webhook-transmission-id"] for r in received}
    assert ids == {delivery["transmissionId"]}
    retried = [r.headers["tosspayments-webhook-transmission-retried-count"] for r in received]
    assert retried == [str(i) for i in range(8)]
    assert received[1].content == received[0].content


def test_only_200_counts_as_delivered(
    api: httpx.Client, hooked: httpx.Client, webhook_sink: WebhookSink
) -> None:
    webhook_sink.answers.extend([204, 200])
    api.delete(f"/v1/billing/{new_billing_key(api, hooked)}")
    _received(webhook_sink, 1)
    hooked.post("/_sandbox/webhooks/flush")
    hooked.post("/_sandbox/clock/advance", json={"minutes": 1})
    hooked.post("/_sandbox/clock/advance", json={"days": 10})
    (delivery,) = hooked.get("/_sandbox/webhooks").json()["deliveries"]
    assert delivery["state"] == "delivered"
    assert [a["status"] for a in delivery["attempts"]] == [204, 200]
    assert len(webhook_sink.received) == 2


def test_no_url_no_delivery(
    api: httpx.Client, control: httpx.Client, webhook_sink: WebhookSink
) -> None:
    api.delete(f"/v1/billing/{new_billing_key(api, control)}")
    control.post("/_sandbox/clock/advance", json={"days": 1})
    (delivery,) = control.get("/_sandbox/webhooks").json()["deliveries"]
    assert (delivery["state"], delivery["attempts"]) == ("no_url", [])
    assert webhook_sink.received == []
