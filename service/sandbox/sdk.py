"""Stand-in for the SDK v2 billing-auth window: the script and the hosted card form.

``GET /v2/standard`` serves a script defining ``TossPayments(clientKey)``; its
``payment({customerKey}).requestBillingAuth({...})`` validates like the SDK and navigates to
``GET /v2/billing-auth``, a card form. Submitting it mints a one-time authKey bound to the
customerKey, the card and the merchant of the clientKey (an unknown clientKey is refused), and
redirects to ``successUrl?customerKey=…&authKey=…`` (an existing query is kept); cancelling or
an invalid card redirects to ``failUrl?code=…&message=…``.
"""

from __future__ import annotations

import html
import re
from importlib import resources
from string import Template
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from service.sandbox.cards import CardRejected, register_card
from service.sandbox.context import Sandbox, sandbox_of
from service.toss import ERROR_CODES

CUSTOMER_KEY = re.compile(r"[A-Za-z0-9_=.@-]{2,50}")  # the SDK's rule, stricter than the API's
_CLIENT_KEY = re.compile(r"(test|live)_ck_\S+")
_STATIC = resources.files("service.sandbox") / "static"
_CANCELED = ("PAY_PROCESS_CANCELED", "사용자에 의해 결제가 취소되었습니다.")


def _static(name: str) -> str:
    return (_STATIC / name).read_text(encoding="utf-8")


def with_query(url: str, **params: str) -> str:
    """``url`` with ``params`` appended to whatever query it already has."""
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *params.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _has_origin(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _check(params: dict[str, str], sandbox: Sandbox) -> str | None:
    """What is wrong with the window's parameters (the SDK checked them already)."""
    client_key = params.get("clientKey", "")
    if not _CLIENT_KEY.fullmatch(client_key):
        return "clientKey는 API 개별 연동 클라이언트 키여야 합니다."
    if sandbox.merchant_for_client_key(client_key) is None:
        return "등록되지 않은 clientKey입니다."
    if not CUSTOMER_KEY.fullmatch(params.get("customerKey", "")):
        return "customerKey 형식이 올바르지 않습니다."
    if not (_has_origin(params.get("successUrl", "")) and _has_origin(params.get("failUrl", ""))):
        return "successUrl과 failUrl은 오리진을 포함해야 합니다."
    return None


async def _script(request: Request) -> Response:
    return Response(_static("standard.js"), media_type="application/javascript")


async def _form(request: Request) -> Response:
    params = dict(request.query_params)
    problem = _check(params, sandbox_of(request))
    if problem is not None:
        return HTMLResponse(f"<p>{html.escape(problem)}</p>", status_code=400)
    page = Template(_static("billing_auth.html")).substitute(
        client_key=html.escape(params["clientKey"]),
        customer_key=html.escape(params["customerKey"]),
        success_url=html.escape(params["successUrl"]),
        fail_url=html.escape(params["failUrl"]),
    )
    return HTMLResponse(page)


async def _submit(request: Request) -> Response:
    raw = (await request.body()).decode("utf-8", errors="replace")
    form = dict(parse_qsl(raw, keep_blank_values=True))
    sandbox = sandbox_of(request)
    problem = _check(form, sandbox)
    merchant = sandbox.merchant_for_client_key(form.get("clientKey", ""))
    if problem is not None or merchant is None:
        return HTMLResponse(f"<p>{html.escape(problem or '')}</p>", status_code=400)
    if form.get("action") == "cancel":
        code, message = _CANCELED
        return RedirectResponse(with_query(form["failUrl"], code=code, message=message), 303)
    month, _, year = form.get("expiry", "").replace(" ", "").partition("/")
    number = re.sub(r"[\s-]", "", form.get("cardNumber", ""))
    try:
        card = register_card(number, year, month, form.get("identity", ""), sandbox.clock.now())
    except CardRejected as exc:
        message = ERROR_CODES[exc.code].message
        return RedirectResponse(with_query(form["failUrl"], code=exc.code, message=message), 303)
    auth_key = merchant.store.mint_auth_key(form["customerKey"], card)
    target = with_query(form["successUrl"], customerKey=form["customerKey"], authKey=auth_key)
    return RedirectResponse(target, 303)


routes = [
    Route("/v2/standard", _script, methods=["GET"]),
    Route("/v2/billing-auth", _form, methods=["GET"]),
    Route("/v2/billing-auth", _submit, methods=["POST"]),
]
