"""The privilege matrix through the Data API (the real PostgREST behind the gateway), over every
table, view and function of every schema the catalogs hold, for anon, two subscribers, analyst,
billing_service and service_role: each refusal is asserted (HTTP status and code), and after all of
them no table has changed. Then the two subscribers, both paying, each see only their own rows.

tests/api walks one relation per schema and each api function; this walks them all, so a table,
view or function added later is covered without being listed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from apikit import client
from seckit import SUBSCRIBER, Catalog, Function, Relation, changed, contents
from test_api_client import rpc, subscribe

from service.runtime.api import ApiSettings, DataApi
from service.runtime.cluster import ADMIN_USER
from service.runtime.signin import SignedIn, sign_in

REFUSED_SCHEMA = (406, "PGRST106")


@dataclass(frozen=True)
class Caller:
    name: str
    role: str
    token: str | None  # None: the anon key alone, as an app before sign-in


@pytest.fixture(scope="module")
def pair(data_api: DataApi) -> tuple[SignedIn, SignedIn]:
    """Two subscribers, each with a paid first period."""
    a = sign_in(data_api, f"a{uuid.uuid4().hex[:8]}@example.com")
    b = sign_in(data_api, f"b{uuid.uuid4().hex[:8]}@example.com")
    subscribe(data_api, a)
    subscribe(data_api, b)
    return a, b


@pytest.fixture
def owner(data_api: DataApi) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(data_api.rt.dsn(data_api.dbname, ADMIN_USER), autocommit=True) as c:
        yield c


def callers(api: DataApi, pair: tuple[SignedIn, SignedIn]) -> list[Caller]:
    def role_token(role: str) -> str:
        return api.sign({"role": role, "exp": int(time.time()) + 600})

    return [
        Caller("anon", "anon", None),
        Caller("subscriber A", SUBSCRIBER, pair[0].access_token),
        Caller("subscriber B", SUBSCRIBER, pair[1].access_token),
        Caller("analyst", "analyst", role_token("analyst")),
        Caller("billing_service", "billing_service", role_token("billing_service")),
        Caller("service_role", "service_role", api.service_role_key),
    ]


def headers(api: DataApi, caller: Caller, schema: str) -> dict[str, str]:
    h = {"apikey": api.anon_key, "Accept-Profile": schema, "Content-Profile": schema}
    h["Authorization"] = f"Bearer {caller.token or api.anon_key}"
    return h


def answer(r: httpx.Response) -> tuple[int, str | None]:
    try:
        body = r.json()
    except ValueError:
        body = None
    return r.status_code, body.get("code") if isinstance(body, dict) else None


def denied(caller: Caller) -> tuple[int, str]:
    """How PostgREST refuses a role without the privilege: 401 for anon, 403 for the others."""
    return (401, "42501") if caller.role == "anon" else (403, "42501")


def relation_requests(
    http: httpx.Client, rel: Relation, h: dict[str, str]
) -> dict[str, httpx.Response]:
    url = f"/{rel.name}"
    everything = {rel.first_column or "id": "not.is.null"}
    return {
        "GET": http.get(url, headers=h, params={"limit": "1"}),
        "POST": http.post(url, headers=h, json={}),
        "PATCH": http.patch(url, headers=h, params=everything, json={}),
        "DELETE": http.delete(url, headers=h, params=everything),
    }


def function_request(http: httpx.Client, fn: Function, h: dict[str, str]) -> httpx.Response:
    return http.post(f"/rpc/{fn.name}", headers=h, json=dict.fromkeys(fn.arg_names))


def test_every_relation_and_function_refuses_whom_it_should_and_changes_nothing(
    data_api: DataApi, pair: tuple[SignedIn, SignedIn], owner: psycopg.Connection[Any]
) -> None:
    exposed = set(ApiSettings.load(data_api.rt.root).schemas)
    assert exposed == {"api"}
    catalog = Catalog.read(owner)
    assert catalog.unclassified() == []
    before = contents(owner)
    surprises: list[tuple[str, str, str, tuple[int, str | None]]] = []
    checked = 0
    with httpx.Client(base_url=data_api.rest_url, timeout=30) as http:
        for caller in callers(data_api, pair):
            for rel in catalog.relations:
                h = headers(data_api, caller, rel.schema)
                want = REFUSED_SCHEMA if rel.schema not in exposed else denied(caller)
                for method, r in relation_requests(http, rel, h).items():
                    checked += 1
                    if answer(r) != want:
                        surprises.append((caller.name, rel.qualified, method, answer(r)))
            for fn in catalog.functions:
                if fn.schema in exposed and fn.granted(caller.role):
                    continue  # the subscriber's own calls: the test below and tests/api
                h = headers(data_api, caller, fn.schema)
                want = REFUSED_SCHEMA if fn.schema not in exposed else denied(caller)
                got = answer(function_request(http, fn, h))
                checked += 1
                if got != want:
                    surprises.append((caller.name, fn.signature, "RPC", got))
    assert surprises == []
    subscriber_calls = sum(1 for f in catalog.functions if f.granted(SUBSCRIBER))
    assert checked == 6 * (4 * len(catalog.relations) + len(catalog.functions)) - 2 * (
        subscriber_calls
    )
    assert changed(before, contents(owner)) == []


def _own(owner: psycopg.Connection[Any], who: SignedIn) -> dict[str, Any]:
    sub_id, status = owner.execute(
        "select id::text, status::text from billing.subscriptions where user_id = %s",
        (str(who.user_id),),
    ).fetchone() or (None, None)
    keys = {
        r[0]
        for r in owner.execute(
            "select order_id from billing.payments where user_id = %s", (str(who.user_id),)
        ).fetchall()
    }
    [balance] = owner.execute(
        "select coalesce(sum(amount), 0)::int from billing.credit_entries where user_id = %s",
        (str(who.user_id),),
    ).fetchone() or [None]
    return {"subscription": sub_id, "status": status, "payments": keys, "balance": balance}


def test_two_subscribers_each_see_and_change_only_their_own_rows(
    data_api: DataApi, pair: tuple[SignedIn, SignedIn], owner: psycopg.Connection[Any]
) -> None:
    a, b = pair
    truth_a, truth_b = _own(owner, a), _own(owner, b)
    assert truth_a["subscription"] != truth_b["subscription"]
    assert truth_a["payments"]
    assert truth_b["payments"]
    assert not truth_a["payments"] & truth_b["payments"]
    with client(data_api, a.access_token) as ca, client(data_api, b.access_token) as cb:
        for c, truth in ((ca, truth_a), (cb, truth_b)):
            assert rpc(c, "my_subscription")["subscriptionId"] == truth["subscription"]
            assert {p["orderId"] for p in rpc(c, "my_payments")} == truth["payments"]
            assert rpc(c, "my_credits")["balance"] == truth["balance"] == 10
        # B spends a credit and cancels: A's rows do not move.
        a_rows = contents_of(owner, a)
        assert rpc(cb, "consume_credit", {"reason": "reading"})["balance"] == 9
        assert rpc(cb, "cancel_subscription")["cancelAtPeriodEnd"] is True
        assert contents_of(owner, a) == a_rows
        assert rpc(ca, "my_credits")["balance"] == 10
        assert rpc(ca, "my_subscription")["cancelAtPeriodEnd"] is False
        assert rpc(cb, "resume_subscription")["cancelAtPeriodEnd"] is False


def contents_of(owner: psycopg.Connection[Any], who: SignedIn) -> list[tuple[Any, ...]]:
    """Every row of the subscriber's in the tables that carry a user_id."""
    tables = owner.execute(
        "select c.oid::regclass::text from pg_class c join pg_attribute a on a.attrelid = c.oid"
        " where c.relnamespace = 'billing'::regnamespace and c.relkind = 'r'"
        " and a.attname = 'user_id' order by 1"
    ).fetchall()
    assert len(tables) >= 5
    out: list[tuple[Any, ...]] = []
    for (table,) in tables:
        out.extend(
            owner.execute(
                f"select '{table}', t::text from {table} t where user_id = %s order by 2",  # noqa: S608  # table names from the catalog
                (str(who.user_id),),
            ).fetchall()
        )
    return out


def test_no_api_call_takes_an_amount_and_extra_arguments_change_nothing(
    data_api: DataApi, pair: tuple[SignedIn, SignedIn], owner: psycopg.Connection[Any]
) -> None:
    """No api function has a parameter that could carry money, and PostgREST refuses any call
    with one added (no such function) before anything runs."""
    catalog = Catalog.read(owner, ["api"])
    money = {"amount", "price", "total", "totalamount", "total_amount", "currency", "plan_id"}
    assert [f.signature for f in catalog.functions if money & set(f.arg_names)] == []
    before = contents(owner)
    caller = callers(data_api, pair)[1]
    extras = [{"amount": 1}, {"totalAmount": 1}, {"price": 100, "currency": "USD"}]
    with httpx.Client(base_url=data_api.rest_url, timeout=30) as http:
        for fn in catalog.functions:
            for extra in extras:
                body = {**dict.fromkeys(fn.arg_names, "pro"), **extra}
                r = http.post(
                    f"/rpc/{fn.name}", headers=headers(data_api, caller, "api"), json=body
                )
                assert answer(r) == (404, "PGRST202"), (fn.signature, extra, r.text)
    assert changed(before, contents(owner)) == []
    # What a registration quotes is the plan's price in the database.
    with httpx.Client(base_url=data_api.rest_url, timeout=30) as http:
        quoted = http.post(
            "/rpc/begin_registration",
            headers=headers(data_api, caller, "api"),
            json={"plan": "pro"},
        ).json()
    price = owner.execute(
        "select pp.amount from billing.plan_prices pp join billing.plans p on p.id = pp.plan_id"
        " where p.code = 'pro' order by pp.effective_from desc limit 1"
    ).fetchone()
    assert price is not None
    assert quoted["amount"] == price[0] == 9900
