"""saju-billing ops: what support runs, against a database the real loop filled."""

from __future__ import annotations

import json

import pytest
from loopkit import Stack

from service import cli


def _ops(stack: Stack, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    url = stack.settings.database_url.get_secret_value()
    code = cli.main(["ops", "--database-url", url, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_status_history_refund_cancel_and_refusals(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    stack.register("u1")
    stack.wait(
        lambda: stack.bl.scalar("select status::text from billing.subscriptions") == "active",
        "the first charge",
    )
    code, out, _ = _ops(stack, capsys, "--json", "status")
    status = json.loads(out)
    assert code == 0
    assert status["subscriptions"] == {"active": 1}
    assert status["attemptsUnknown"] == 0

    code, out, _ = _ops(stack, capsys, "--json", "history", "u1")
    history = json.loads(out)
    assert code == 0
    assert {"subscriptions", "charge_attempts", "payments"} <= {h["entity_type"] for h in history}
    assert history == sorted(history, key=lambda h: h["occurred_at"])

    payment_id = str(stack.bl.scalar("select id from billing.payments"))
    before = stack.bl.scalar("select count(*) from billing.events")
    code, _, err = _ops(stack, capsys, "refund", payment_id, "--amount", "99999")
    assert code == 2
    assert "refused by a billing rule (SB422)" in err
    assert stack.bl.scalar("select count(*) from billing.events") == before  # nothing changed

    code, out, _ = _ops(stack, capsys, "--json", "refund", payment_id, "--amount", "1000")
    assert code == 0
    assert stack.bl.scalar("select amount from billing.refunds") == 1000

    sub = str(stack.bl.scalar("select id from billing.subscriptions"))
    code, _, err = _ops(stack, capsys, "retry", sub)
    assert code == 2
    assert "(SB409)" in err

    code, out, _ = _ops(stack, capsys, "--json", "cancel", sub, "--prorate")
    ended = json.loads(out)
    assert (code, ended["status"]) == (0, "canceled")
    assert ended["refundAmount"] > 0

    code, out, _ = _ops(stack, capsys, "history", "no-such-user")
    assert code == 2

    code, out, _ = _ops(stack, capsys, "alerts")
    assert code == 0
    code, out, _ = _ops(stack, capsys, "--json", "reconcile")
    assert code == 0
    run = json.loads(out)["reconciliationId"]
    code, out, _ = _ops(stack, capsys, "--json", "reconciliations")
    assert code == 0
    assert [r["reconciliation_id"] for r in json.loads(out)] == [run]
    code, out, _ = _ops(stack, capsys, "reconciliations")  # the table for people
    assert (code, out.count("\n") > 3) == (0, True)
