"""Subscribers through the real Data API: the ``supabase`` client, PostgREST 12.0.2 as
``authenticator``, the gateway at ``/rest/v1/``, user tokens shaped like Supabase Auth's.

Every ``api.*`` function is called as an app calls it, and the privilege matrix is walked over
every schema with ``Accept-Profile``: each refusal is asserted (HTTP status and code) and changes
nothing (row counts of every billing table and auth.users, and billing.events).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
import psycopg
import pytest
from apikit import Statuses, client, snapshot
from dbkit import GOOD_CARD, KEYRING, Billing, TossSandbox, card_of, serve_sandbox
from postgrest.exceptions import APIError

from service import db
from service.runtime.api import DataApi
from service.runtime.cluster import Runtime
from service.runtime.signin import SignedIn, call_api, sign_in

SCHEMAS = ["api", "billing", "analytics", "auth", "net", "vault", "cron", "public", "extensions"]
REFUSED_SCHEMA = {"code": "PGRST106", "status": 406}


def rpc(c: Any, fn: str, params: dict[str, Any] | None = None, schema: str = "api") -> Any:
    return c.schema(schema).rpc(fn, params or {}).execute().data


def refused(c: Any, fn: str, params: dict[str, Any] | None = None, schema: str = "api") -> str:
    with pytest.raises(APIError) as exc:
        rpc(c, fn, params, schema)
    assert exc.value.code is not None
    return exc.value.code


def complete_registration(rt: Runtime, dbname: str, customer_key: str) -> None:
    """What the service does after Toss (the sandbox) issues the billing key, then the first
    charge at Toss."""
    with serve_sandbox() as (url, clock):
        toss = TossSandbox(url, clock)
        bl = Billing(rt, dbname, toss)
        try:
            issued = toss.issue_billing_key(customer_key, GOOD_CARD)
            sealed = KEYRING.seal(issued["billingKey"], customer_key)
            bl.run(db.service_complete_registration(customer_key, sealed, card_of(issued)))
            [row] = bl.claim()
            assert bl.serve(row).detail["applied"] is True
        finally:
            bl.close()
            toss.close()


def subscribe(data_api: DataApi, who: SignedIn) -> None:
    with client(data_api, who.access_token) as c:
        reg = rpc(c, "begin_registration", {"plan": "pro"})
    complete_registration(data_api.rt, data_api.dbname, reg["customerKey"])


@pytest.fixture(scope="module")
def subscriber_a(data_api: DataApi) -> SignedIn:
    """A subscriber whose first period is paid (10 credits)."""
    who = sign_in(data_api, f"a{uuid.uuid4().hex[:8]}@example.com")
    subscribe(data_api, who)
    return who


# --- every api.* function through the client -----------------------------------------------


def test_the_subscriber_path_through_the_supabase_client(data_api: DataApi, user: SignedIn) -> None:
    with client(data_api, user.access_token) as c:
        assert rpc(c, "my_subscription") is None
        assert rpc(c, "my_payments") == []
        assert rpc(c, "my_credits")["balance"] == 0

        reg = rpc(c, "begin_registration", {"plan": "pro"})
        assert reg["amount"] == 9900
        assert reg["customerEmail"] == user.email
        assert reg["customerKey"].startswith("ck_")
        complete_registration(data_api.rt, data_api.dbname, reg["customerKey"])

        sub = rpc(c, "my_subscription")
        assert (sub["status"], sub["plan"]["code"], sub["currentPeriod"]["amount"]) == (
            "active",
            "pro",
            9900,
        )
        assert sub["card"]["numberMasked"] == "94100012****789*"  # as Toss masks GOOD_CARD
        [payment] = rpc(c, "my_payments")
        assert (payment["totalAmount"], payment["status"], payment["periodIndex"]) == (
            9900,
            "DONE",
            1,
        )
        assert rpc(c, "my_credits")["balance"] == 10

        assert rpc(c, "consume_credit", {"reason": "saju reading"})["balance"] == 9
        assert rpc(c, "my_credits")["balance"] == 9

        cancelled = rpc(c, "cancel_subscription")
        assert (cancelled["status"], cancelled["cancelAtPeriodEnd"]) == ("active", True)
        assert cancelled["nextChargeAt"] is None
        resumed = rpc(c, "resume_subscription")
        assert (resumed["status"], resumed["cancelAtPeriodEnd"]) == ("active", False)
        assert resumed["nextChargeAt"] == sub["nextChargeAt"]


def refused_with(c: Any, statuses: Statuses, fn: str, params: dict[str, Any] | None = None) -> Any:
    """(SBxxx code, HTTP status) of a refused call."""
    return refused(c, fn, params), statuses.last


def test_errors_arrive_with_their_http_status_and_sb_code_and_change_nothing(
    data_api: DataApi, user: SignedIn, subscriber_a: SignedIn
) -> None:
    statuses = Statuses()
    no_sub = data_api.sign(
        {"role": "authenticated", "aud": "authenticated", "exp": int(time.time()) + 600}
    )
    with (
        client(data_api, user.access_token, statuses) as c,
        client(data_api, subscriber_a.access_token, statuses) as a,
        client(data_api, no_sub, statuses) as anonymous_user,
    ):
        before = snapshot(data_api.rt, data_api.dbname)
        assert refused_with(c, statuses, "cancel_subscription") == ("SB404", 404)
        assert refused_with(c, statuses, "resume_subscription") == ("SB404", 404)
        assert refused_with(c, statuses, "consume_credit", {"reason": ""}) == ("SB400", 400)
        assert refused_with(c, statuses, "consume_credit", {"reason": "none"}) == ("SB422", 422)
        assert refused_with(c, statuses, "begin_registration", {"plan": "gold"}) == ("SB404", 404)
        # A live subscription that is not scheduled to cancel cannot be resumed.
        assert refused_with(a, statuses, "resume_subscription") == ("SB409", 409)
        assert refused_with(anonymous_user, statuses, "my_subscription") == ("SB401", 401)
        assert snapshot(data_api.rt, data_api.dbname) == before


def test_sql_callers_still_get_the_sb_sqlstates(rt: Runtime, api_dbname: str) -> None:
    """The translation happens only inside a Data API request."""
    with psycopg.connect(rt.dsn(api_dbname, "postgres")) as conn:
        conn.execute("set local role authenticated")
        conn.execute(
            "select set_config('request.jwt.claims', %s, true)",
            (f'{{"sub": "{uuid.uuid4()}", "role": "authenticated"}}',),
        )
        with pytest.raises(psycopg.Error) as exc:
            conn.execute("select api.cancel_subscription()")
        assert exc.value.sqlstate == "SB404"


def test_every_api_function_is_a_thin_wrapper_of_its_body_in_api_impl(
    rt: Runtime, api_dbname: str
) -> None:
    with psycopg.connect(rt.dsn(api_dbname, "postgres")) as conn:
        rows = conn.execute(
            "select p.proname, pg_get_function_identity_arguments(p.oid), p.prosrc,"
            " (select count(*) from pg_proc i where i.pronamespace = 'api_impl'::regnamespace"
            "   and i.proname = p.proname and pg_get_function_identity_arguments(i.oid)"
            "     = pg_get_function_identity_arguments(p.oid))"
            " from pg_proc p where p.pronamespace = 'api'::regnamespace order by 1"
        ).fetchall()
    assert [r[0] for r in rows] == sorted(fn for fn, _ in CALLS)
    for name, _args, source, bodies in rows:
        assert f"api_impl.{name}(" in source, name
        assert "api_impl.raise_http_error" in source, name
        assert bodies == 1, name


# --- the privilege matrix --------------------------------------------------------------------


def _role_token(api: DataApi, role: str) -> str:
    return api.sign({"role": role, "exp": int(time.time()) + 600})


def _callers(api: DataApi) -> dict[str, tuple[str | None, int, str]]:
    """name -> (token, HTTP status and code of a refused call in schema api)."""
    now = int(time.time())
    user_claims = {"sub": str(uuid.uuid4()), "role": "authenticated", "aud": "authenticated"}
    return {
        "anon": (None, 401, "42501"),
        "service_role": (api.service_role_key, 403, "42501"),
        "billing_service": (_role_token(api, "billing_service"), 403, "42501"),
        "analyst": (_role_token(api, "analyst"), 403, "42501"),
        "postgres": (_role_token(api, "postgres"), 403, "42501"),
        # PostgREST allows 30 s of clock skew; an hour ago is expired everywhere.
        "expired": (api.sign({**user_claims, "exp": now - 3600}), 401, "PGRST301"),
        "forged": (
            jwt.encode({**user_claims, "exp": now + 600}, "x" * 48, algorithm="HS256"),
            401,
            "PGRST301",
        ),
        "without exp": (api.sign(user_claims), 401, "PT401"),
        "other audience": (
            api.sign({**user_claims, "aud": "other", "exp": now + 600}),
            401,
            "PGRST301",
        ),
    }


CALLERS = [
    "anon",
    "service_role",
    "billing_service",
    "analyst",
    "postgres",
    "expired",
    "forged",
    "without exp",
    "other audience",
]
CALLS: list[tuple[str, dict[str, Any]]] = [
    ("my_subscription", {}),
    ("my_payments", {}),
    ("my_credits", {}),
    ("begin_registration", {"plan": "pro"}),
    ("cancel_subscription", {}),
    ("resume_subscription", {}),
    ("consume_credit", {"reason": "not mine"}),
]
# One relation per schema a caller might try to read directly.
TABLES = {
    "api": "subscriptions",
    "billing": "subscriptions",
    "analytics": "subscription_counts",
    "auth": "users",
    "net": "http_request_queue",
    "vault": "decrypted_secrets",
    "cron": "job",
    "public": "subscriptions",
    "extensions": "pg_stat_statements",
}


@pytest.mark.parametrize("caller", CALLERS)
def test_callers_without_a_subscriber_token_are_refused_everywhere(
    data_api: DataApi, subscriber_a: SignedIn, caller: str
) -> None:
    token, status, code = _callers(data_api)[caller]
    statuses = Statuses()
    with client(data_api, token, statuses) as c:
        bad_token = code in ("PGRST301", "PT401")
        before = snapshot(data_api.rt, data_api.dbname)
        for schema in SCHEMAS:
            # A bad token is refused before the schema is looked at.
            want_status, want_code = (
                (status, code)
                if schema == "api" or (bad_token and code == "PGRST301")
                else (REFUSED_SCHEMA["status"], REFUSED_SCHEMA["code"])
            )
            for fn, params in CALLS:
                assert refused(c, fn, params, schema) == want_code, (caller, schema, fn)
                assert statuses.last == want_status, (caller, schema, fn)
            with pytest.raises(APIError) as exc:
                c.schema(schema).table(TABLES[schema]).select("*").execute()
            if schema == "api" and not bad_token:
                # No tables in api at all; only a subscriber's role may even look into the schema.
                assert exc.value.code == code
            else:
                assert exc.value.code == want_code, (caller, schema)
        assert snapshot(data_api.rt, data_api.dbname) == before


def test_a_subscriber_reaches_only_api_and_only_their_own_rows(
    data_api: DataApi, subscriber_a: SignedIn, user: SignedIn
) -> None:
    statuses = Statuses()
    with (
        client(data_api, subscriber_a.access_token) as a,
        client(data_api, user.access_token, statuses) as b,  # a second one, no subscription
    ):
        mine = rpc(a, "my_subscription")
        assert mine["status"] == "active"
        before = snapshot(data_api.rt, data_api.dbname)
        assert rpc(b, "my_subscription") is None
        assert rpc(b, "my_payments") == []
        assert rpc(b, "my_credits")["balance"] == 0
        assert refused(b, "cancel_subscription") == "SB404"
        assert refused(b, "consume_credit", {"reason": "someone else's"}) == "SB422"
        for schema in SCHEMAS[1:]:
            for fn, params in CALLS:
                assert refused(b, fn, params, schema) == "PGRST106"
                assert statuses.last == 406
            with pytest.raises(APIError) as exc:
                b.schema(schema).table(TABLES[schema]).select("*").execute()
            assert exc.value.code == "PGRST106"
        with pytest.raises(APIError) as exc:
            b.schema("api").table("subscriptions").select("*").execute()
        assert exc.value.code == "42P01"  # api holds functions only: no such relation
        assert snapshot(data_api.rt, data_api.dbname) == before
        # A's subscription and credits are untouched by B's attempts.
        assert rpc(a, "my_subscription") == mine
        assert rpc(a, "my_credits")["balance"] == 10


def test_tokens_are_verified_with_the_local_secret(rt: Runtime, data_api: DataApi) -> None:
    decoded = jwt.decode(
        data_api.anon_key, data_api.jwt_secret, algorithms=["HS256"], options={"verify_exp": True}
    )
    assert decoded == {"iss": "supabase-demo", "role": "anon", "exp": 1983812996}
    who = sign_in(data_api, f"t{uuid.uuid4().hex[:8]}@example.com")
    claims = jwt.decode(
        who.access_token, data_api.jwt_secret, algorithms=["HS256"], audience="authenticated"
    )
    assert set(claims) >= {
        "sub", "role", "aud", "exp", "iat", "email", "aal", "session_id", "is_anonymous"
    }  # fmt: skip
    assert claims["sub"] == str(who.user_id)
    assert claims["role"] == "authenticated"
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["aal"] == "aal1"
    assert claims["is_anonymous"] is False
    uuid.UUID(claims["session_id"])
    with psycopg.connect(rt.dsn(data_api.dbname, "postgres")) as conn:
        row = conn.execute(
            "select email, aud, role from auth.users where id = %s", (who.user_id,)
        ).fetchone()
    assert row == (who.email, "authenticated", "authenticated")
    # Signing in again by email finds the same user.
    assert sign_in(data_api, who.email or "").user_id == who.user_id


def test_call_api_is_the_same_path_for_the_demo(data_api: DataApi, subscriber_a: SignedIn) -> None:
    assert call_api(data_api, subscriber_a.access_token, "my_credits")["balance"] == 10
    with pytest.raises(APIError) as exc:
        call_api(data_api, subscriber_a.access_token, "consume_credit", {"reason": ""})
    assert exc.value.code == "SB400"
