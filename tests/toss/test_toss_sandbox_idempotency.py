"""Idempotency-Key in the sandbox exactly as reference §8 describes it."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import httpx
import pytest
from sandbox_harness import (
    CUSTOMER_KEY,
    SECRET_KEY,
    LiveServer,
    basic,
    charge,
    mint_auth_key,
    new_billing_key,
)


def _key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


def _approvals(control: httpx.Client) -> list[dict[str, object]]:
    entries: list[dict[str, object]] = control.get("/_sandbox/ledger").json()["entries"]
    return [e for e in entries if e["kind"] == "approval"]


def test_same_key_replays_the_first_response_whatever_the_body(
    api: httpx.Client, control: httpx.Client
) -> None:
    billing_key = new_billing_key(api, control)
    first = charge(api, billing_key, "order-idem-1", 4900, headers=_key("k-1"))
    replay = charge(api, billing_key, "order-idem-2", 9900, headers=_key("k-1"))
    assert first.status_code == replay.status_code == 200
    assert replay.content == first.content
    assert first.headers["idempotency-key"] == replay.headers["idempotency-key"] == "k-1"
    assert [e["orderId"] for e in _approvals(control)] == ["order-idem-1"]


def test_error_responses_are_replayed_too(api: httpx.Client, control: httpx.Client) -> None:
    billing_key = new_billing_key(api, control)
    bad = charge(api, billing_key, "bad", headers=_key("k-err"))  # orderId too short
    fixed = charge(api, billing_key, "order-fixed-1", headers=_key("k-err"))
    assert bad.status_code == fixed.status_code == 400
    assert fixed.json()["code"] == "INVALID_ORDER_ID"
    assert fixed.content == bad.content
    assert _approvals(control) == []


def test_test_code_errors_are_stored_under_the_key(
    api: httpx.Client, control: httpx.Client
) -> None:
    billing_key = new_billing_key(api, control)
    headers = {**_key("k-tc"), "TossPayments-Test-Code": "REJECT_CARD_PAYMENT"}
    first = charge(api, billing_key, "order-tc-idem", headers=headers)
    retry = charge(api, billing_key, "order-tc-idem", headers=_key("k-tc"))
    assert first.status_code == retry.status_code == 403
    assert retry.content == first.content


def test_issue_is_idempotent_too(api: httpx.Client, control: httpx.Client) -> None:
    # "every POST API": a lost issuance answer can be fetched again with the same key,
    # although the one-time authKey is used up.
    auth_key = mint_auth_key(control, CUSTOMER_KEY)
    body = {"authKey": auth_key, "customerKey": CUSTOMER_KEY}
    path = "/v1/billing/authorizations/issue"
    first = api.post(path, json=body, headers=_key("issue-1"))
    replay = api.post(path, json=body, headers=_key("issue-1"))
    fresh = api.post(path, json=body, headers=_key("issue-2"))
    assert first.status_code == replay.status_code == 200
    assert replay.content == first.content
    assert (fresh.status_code, fresh.json()["code"]) == (400, "INVALID_BILLING_AUTH")


def test_in_flight_answer_from_a_test_code_is_not_stored(
    api: httpx.Client, control: httpx.Client
) -> None:
    # 409 means "not processed": the same key then runs the request (§8, §12).
    billing_key = new_billing_key(api, control)
    headers = {**_key("k-409"), "TossPayments-Test-Code": "IDEMPOTENT_REQUEST_PROCESSING"}
    busy = charge(api, billing_key, "order-409", headers=headers)
    done = charge(api, billing_key, "order-409", headers=_key("k-409"))
    assert (busy.status_code, busy.json()["code"]) == (409, "IDEMPOTENT_REQUEST_PROCESSING")
    assert (done.status_code, done.json()["status"]) == (200, "DONE")
    assert [e["orderId"] for e in _approvals(control)] == ["order-409"]


def test_key_is_scoped_by_url(api: httpx.Client, control: httpx.Client) -> None:
    first_key = new_billing_key(api, control)
    second_key = new_billing_key(api, control)
    a = charge(api, first_key, "order-url-1", headers=_key("shared"))
    b = charge(api, second_key, "order-url-2", headers=_key("shared"))
    assert a.json()["paymentKey"] != b.json()["paymentKey"]
    assert len(_approvals(control)) == 2


def test_key_is_scoped_by_secret_key(start_sandbox: Callable[..., LiveServer]) -> None:
    # Two secret keys of one merchant: the same data, separate idempotency keys.
    other_key = "test_sk_" + "B" * 28
    server = start_sandbox(secret_keys=[f"{SECRET_KEY}:{other_key}"])
    with (
        httpx.Client(base_url=server.url, headers=basic(SECRET_KEY)) as api,
        httpx.Client(base_url=server.url) as control,
    ):
        billing_key = new_billing_key(api, control)
        a = charge(api, billing_key, "order-sk-1", headers=_key("shared"))
        b = charge(api, billing_key, "order-sk-2", headers={**_key("shared"), **basic(other_key)})
    assert (a.status_code, b.status_code) == (200, 200)
    assert a.json()["paymentKey"] != b.json()["paymentKey"]


def test_key_length_limit(api: httpx.Client, control: httpx.Client) -> None:
    billing_key = new_billing_key(api, control)
    too_long = charge(api, billing_key, "order-long-1", headers=_key("k" * 301))
    assert too_long.status_code == 400
    assert too_long.json() == {
        "code": "INVALID_IDEMPOTENCY_KEY",
        "message": "멱등키는 300자 이하여야 합니다.",
    }
    assert charge(api, billing_key, "order-long-2", headers=_key("k" * 300)).status_code == 200
    assert [e["orderId"] for e in _approvals(control)] == ["order-long-2"]


def test_key_expires_after_fifteen_days(api: httpx.Client, control: httpx.Client) -> None:
    billing_key = new_billing_key(api, control)
    first = charge(api, billing_key, "order-exp-1", headers=_key("k-exp"))
    control.post("/_sandbox/clock/advance", json={"days": 14, "hours": 23, "minutes": 59})
    still = charge(api, billing_key, "order-exp-2", headers=_key("k-exp"))
    assert still.content == first.content
    control.post("/_sandbox/clock/advance", json={"minutes": 1})
    fresh = charge(api, billing_key, "order-exp-3", headers=_key("k-exp"))
    assert fresh.status_code == 200
    assert fresh.json()["orderId"] == "order-exp-3"
    assert [e["orderId"] for e in _approvals(control)] == ["order-exp-1", "order-exp-3"]


def test_cancel_replay_does_not_refund_twice(api: httpx.Client, control: httpx.Client) -> None:
    payment = charge(api, new_billing_key(api, control), "order-refund-1", 10000).json()
    path = f"/v1/payments/{payment['paymentKey']}/cancel"
    body = {"cancelReason": "환불", "cancelAmount": 3000}
    first = api.post(path, json=body, headers=_key("refund-1"))
    replay = api.post(path, json=body, headers=_key("refund-1"))
    assert replay.content == first.content
    assert api.get(f"/v1/payments/{payment['paymentKey']}").json()["balanceAmount"] == 7000


def test_header_is_ignored_on_get_and_delete(api: httpx.Client, control: httpx.Client) -> None:
    billing_key = new_billing_key(api, control)
    payment = charge(api, billing_key, "order-get-1", 10000).json()
    path = f"/v1/payments/{payment['paymentKey']}"
    before = api.get(path, headers=_key("get-key"))
    api.post(f"{path}/cancel", json={"cancelReason": "환불", "cancelAmount": 1000})
    after = api.get(path, headers=_key("get-key"))
    assert (before.json()["balanceAmount"], after.json()["balanceAmount"]) == (10000, 9000)
    # Ignored means not even checked: a key over 300 characters is no error on a GET.
    assert api.get(path, headers=_key("g" * 301)).json()["balanceAmount"] == 9000
    first_delete = api.delete(f"/v1/billing/{billing_key}", headers=_key("del-key"))
    second_delete = api.delete(f"/v1/billing/{billing_key}", headers=_key("del-key"))
    assert first_delete.status_code == 200
    assert second_delete.json()["code"] == "ALREADY_REMOVED_BILLING_KEY"


@pytest.mark.anyio
async def test_duplicate_while_in_flight_gets_409(
    server: LiveServer, api: httpx.Client, control: httpx.Client
) -> None:
    billing_key = new_billing_key(api, control)
    body = {"customerKey": CUSTOMER_KEY, "amount": 4900, "orderName": "Pro"}
    headers = {**basic(SECRET_KEY), **_key("k-flight")}
    results: dict[str, httpx.Response] = {}

    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as client:
        hold = {"endpoint": "charge", "kind": "hold", "count": 1}
        assert (await client.post("/_sandbox/faults", json=hold)).is_success

        async def first() -> None:
            results["first"] = await client.post(
                f"/v1/billing/{billing_key}", json={**body, "orderId": "order-flight-1"}
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            assert (await client.post("/_sandbox/faults/held", json={"count": 1})).is_success
            duplicate = await client.post(
                f"/v1/billing/{billing_key}", json={**body, "orderId": "order-flight-2"}
            )
            assert duplicate.status_code == 409
            assert duplicate.json()["code"] == "IDEMPOTENT_REQUEST_PROCESSING"
            assert (await client.post("/_sandbox/faults/release")).json() == {"released": 1}
        after = await client.post(
            f"/v1/billing/{billing_key}", json={**body, "orderId": "order-flight-3"}
        )
    assert results["first"].status_code == 200
    assert after.content == results["first"].content
    assert [e["orderId"] for e in _approvals(control)] == ["order-flight-1"]
