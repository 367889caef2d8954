"""Fault injection through the control API: deterministic, per endpoint, observable."""

from __future__ import annotations

import json

import httpx
import pytest
from sandbox_harness import (
    CUSTOMER_KEY,
    LiveServer,
    WebhookSink,
    charge,
    new_billing_key,
    wait_until,
)


def _fault(control: httpx.Client, **spec: object) -> dict[str, object]:
    response = control.post("/_sandbox/faults", json=spec)
    assert response.status_code == 200, response.text
    fault: dict[str, object] = response.json()
    return fault


def _entries(control: httpx.Client) -> list[dict[str, object]]:
    entries: list[dict[str, object]] = control.get("/_sandbox/ledger").json()["entries"]
    return entries


def test_error_fault_for_the_next_n_requests(api: httpx.Client, control: httpx.Client) -> None:
    billing_key = new_billing_key(api, control)
    _fault(control, endpoint="charge", kind="error", count=2, status=500, code="COMMON_ERROR")
    results = [charge(api, billing_key, f"order-f-{i}") for i in range(3)]
    assert [r.status_code for r in results] == [500, 500, 200]
    assert results[0].json()["code"] == "COMMON_ERROR"
    assert [e["orderId"] for e in _entries(control)] == ["order-f-2"]
    (fault,) = control.get("/_sandbox/faults").json()["faults"]
    assert (fault["fired"], fault["count"]) == (2, 0)


def test_error_faults_are_not_stored_under_the_idempotency_key(
    api: httpx.Client, control: httpx.Client
) -> None:
    billing_key = new_billing_key(api, control)
    _fault(control, endpoint="charge", kind="error", count=1, status=503)
    headers = {"Idempotency-Key": "k-fault"}
    failed = charge(api, billing_key, "order-f-idem", headers=headers)
    retried = charge(api, billing_key, "order-f-idem", headers=headers)
    assert (failed.status_code, retried.status_code) == (503, 200)


def test_rate_limit_fault(api: httpx.Client, control: httpx.Client) -> None:
    _fault(control, endpoint="get_payment", kind="error", status=429, count=1)
    limited = api.get("/v1/payments/some-payment")
    after = api.get("/v1/payments/some-payment")
    assert limited.status_code == 429
    assert limited.json()["code"] == "TOO_MANY_REQUESTS"
    assert after.json()["code"] == "NOT_FOUND_PAYMENT"


def test_faults_only_hit_their_endpoint(api: httpx.Client, control: httpx.Client) -> None:
    _fault(control, endpoint="cancel", kind="error", status=500)
    assert api.get("/v1/payments/x").json()["code"] == "NOT_FOUND_PAYMENT"
    cancel = api.post("/v1/payments/x/cancel", json={"cancelReason": "r"})
    assert cancel.status_code == 500


def _pattern(api: httpx.Client, control: httpx.Client, seed: int) -> list[int]:
    control.post("/_sandbox/reset", json={"seed": seed})
    _fault(control, endpoint="*", kind="error", rate=0.5, status=500)
    return [api.get("/v1/payments/x").status_code for _ in range(24)]


def test_rate_faults_are_deterministic_per_seed(api: httpx.Client, control: httpx.Client) -> None:
    first = _pattern(api, control, seed=7)
    again = _pattern(api, control, seed=7)
    other = _pattern(api, control, seed=8)
    assert first == again
    assert first != other
    assert 0 < first.count(500) < len(first)


def test_drop_after_commit_loses_the_response_not_the_charge(
    server: LiveServer, api: httpx.Client, control: httpx.Client
) -> None:
    billing_key = new_billing_key(api, control)
    _fault(control, endpoint="charge", kind="drop_after_commit", count=1)
    headers = {"Idempotency-Key": "k-drop"}
    with pytest.raises(httpx.TransportError):
        charge(api, billing_key, "order-drop-1", headers=headers)
    (entry,) = _entries(control)
    assert entry["orderId"] == "order-drop-1"
    replay = charge(api, billing_key, "order-drop-1", headers=headers)
    assert replay.json()["paymentKey"] == entry["paymentKey"]
    assert len(_entries(control)) == 1


def test_latency_after_commit_times_out_the_client(
    server: LiveServer, api: httpx.Client, control: httpx.Client
) -> None:
    billing_key = new_billing_key(api, control)
    _fault(control, endpoint="charge", kind="latency_after_commit", seconds=2, count=1)
    body = {
        "customerKey": CUSTOMER_KEY,
        "amount": 4900,
        "orderId": "order-slow-1",
        "orderName": "P",
    }
    with pytest.raises(httpx.ReadTimeout):
        api.post(f"/v1/billing/{billing_key}", json=body, timeout=0.5)
    # The sandbox committed the charge before it started to wait.
    assert api.get("/v1/payments/orders/order-slow-1").json()["status"] == "DONE"


def test_latency_delays_processing_not_just_the_answer(
    api: httpx.Client, control: httpx.Client
) -> None:
    billing_key = new_billing_key(api, control)
    _fault(control, endpoint="charge", kind="latency", seconds=0.5, count=1)
    body = {"customerKey": CUSTOMER_KEY, "amount": 4900, "orderId": "order-lag-1", "orderName": "P"}
    with pytest.raises(httpx.ReadTimeout):
        api.post(f"/v1/billing/{billing_key}", json=body, timeout=0.1)
    # Like Toss, the sandbox finishes a request whose client has given up.
    wait_until(lambda: len(_entries(control)) == 1, "the slow charge to be processed")
    assert _entries(control)[0]["orderId"] == "order-lag-1"


@pytest.mark.parametrize(
    "spec",
    [
        {"endpoint": "nope", "kind": "error"},
        {"endpoint": "charge", "kind": "explode"},
        {"endpoint": "charge", "kind": "error", "rate": 2},
        {"endpoint": "charge", "kind": "latency", "seconds": -1},
    ],
)
def test_invalid_fault_specs_are_rejected(control: httpx.Client, spec: dict[str, object]) -> None:
    response = control.post("/_sandbox/faults", json=spec)
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_REQUEST"
    assert control.get("/_sandbox/faults").json()["faults"] == []


def test_clearing_faults(api: httpx.Client, control: httpx.Client) -> None:
    _fault(control, endpoint="*", kind="error", status=500)
    assert api.get("/v1/payments/x").status_code == 500
    assert control.delete("/_sandbox/faults").status_code == 200
    assert api.get("/v1/payments/x").status_code == 404


def test_processed_error_fault_is_replayed_under_its_idempotency_key(
    api: httpx.Client, control: httpx.Client
) -> None:
    billing_key = new_billing_key(api, control)
    _fault(
        control, endpoint="charge", kind="processed_error", count=1, status=400,
        code="PROVIDER_ERROR",
    )  # fmt: skip
    headers = {"Idempotency-Key": "k-processed"}
    failed = charge(api, billing_key, "order-f-processed", headers=headers)
    replayed = charge(api, billing_key, "order-f-processed", headers=headers)
    fresh = charge(api, billing_key, "order-f-processed-2", headers={"Idempotency-Key": "k-new"})
    assert (failed.status_code, failed.json()["code"]) == (400, "PROVIDER_ERROR")
    assert (replayed.status_code, replayed.json()) == (400, failed.json())
    assert fresh.status_code == 200
    assert [e["orderId"] for e in _entries(control)] == ["order-f-processed-2"]


def test_webhook_kinds_belong_to_the_webhook_endpoint(control: httpx.Client) -> None:
    for spec in (
        {"endpoint": "charge", "kind": "duplicate"},
        {"endpoint": "webhook", "kind": "error"},
        {"endpoint": "*", "kind": "delay"},
    ):
        refused = control.post("/_sandbox/faults", json=spec)
        assert refused.status_code == 400, spec
        assert refused.json()["code"] == "INVALID_REQUEST"


def _deleted_key_events(api: httpx.Client, control: httpx.Client, n: int) -> list[str]:
    """Deletes ``n`` billing keys (each sends BILLING_DELETED); returns them in that order."""
    keys = [new_billing_key(api, control, f"{CUSTOMER_KEY}-{i}") for i in range(n)]
    for key in keys:
        assert api.delete(f"/v1/billing/{key}").status_code == 200
    return keys


def _delivered_keys(sink: WebhookSink) -> list[str]:
    return [json.loads(r.content)["data"]["billingKey"] for r in sink.received]


def test_duplicate_webhook_fault_delivers_an_event_twice(
    api: httpx.Client, control: httpx.Client, webhook_sink: WebhookSink
) -> None:
    control.put("/_sandbox/webhook", json={"url": "http://merchant.test/webhooks/toss"})
    _fault(control, endpoint="webhook", kind="duplicate", count=1)
    (key,) = _deleted_key_events(api, control, 1)
    wait_until(lambda: len(webhook_sink.received) >= 2, "the event and its duplicate")
    first, again = webhook_sink.received
    assert _delivered_keys(webhook_sink) == [key, key]
    assert (
        first.headers["tosspayments-webhook-transmission-id"]
        == (again.headers["tosspayments-webhook-transmission-id"])
    )
    retried = [r.headers["tosspayments-webhook-transmission-retried-count"] for r in (first, again)]
    assert retried == ["0", "1"]
    (delivery,) = control.get("/_sandbox/webhooks").json()["deliveries"]
    assert delivery["state"] == "delivered"


def test_delay_webhook_fault_delivers_after_later_events(
    api: httpx.Client, control: httpx.Client, webhook_sink: WebhookSink
) -> None:
    control.put("/_sandbox/webhook", json={"url": "http://merchant.test/webhooks/toss"})
    _fault(control, endpoint="webhook", kind="delay", count=1)
    first, second = _deleted_key_events(api, control, 2)
    wait_until(lambda: len(webhook_sink.received) >= 1, "the second event")
    assert _delivered_keys(webhook_sink) == [second]
    pending = [d for d in control.get("/_sandbox/webhooks").json()["deliveries"]
               if d["state"] == "pending"]  # fmt: skip
    assert [d["attempts"][0]["error"] for d in pending] == ["delayed by a fault"]
    # Toss's first retry comes a minute later on the sandbox clock.
    control.post("/_sandbox/clock/advance", json={"minutes": 1})
    wait_until(lambda: len(webhook_sink.received) >= 2, "the delayed event")
    assert _delivered_keys(webhook_sink) == [second, first]
