"""The local stand-in for signing in with Supabase Auth.

Supabase Auth (GoTrue) has no binary that runs here, so this is the one piece of the Data API
path that is emulated: it creates the ``auth.users`` row a sign-in would have created and mints
the access token Supabase Auth would hand the app — the same claims (``sub``, ``role``, ``aud``,
``exp``, ``iat``, ``email``, ``aal``, ``session_id``, ``is_anonymous``, …), HS256-signed with the
local JWT secret that the local PostgREST verifies. On a hosted project an app gets this token
from ``supabase.auth.sign_in_with_*`` instead.
"""

from __future__ import annotations

import time
import tomllib
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
from postgrest.exceptions import APIError
from supabase.lib.client_options import SyncClientOptions

from service.runtime.api import USER_AUDIENCE, DataApi
from service.runtime.cluster import ADMIN_USER
from supabase import Client, create_client

DEFAULT_EXPIRY = 3600
# PostgREST's answers while its schema cache does not have the function yet.
_NOT_LOADED_YET = {"PGRST202", "PGRST002", "PGRST106"}

_FIND_USER = """
    select id, email from auth.users
    where id = %(id)s or (%(email)s::text is not null and email = %(email)s::text)
    order by id = %(id)s desc
    limit 1
"""

# The columns Supabase Auth fills for an email sign-up; RLS keys on id only.
_CREATE_USER = """
    insert into auth.users
      (instance_id, id, aud, role, email, raw_app_meta_data, raw_user_meta_data, is_anonymous,
       created_at, updated_at)
    values
      ('00000000-0000-0000-0000-000000000000', %(id)s, 'authenticated', 'authenticated',
       %(email)s, '{"provider": "email", "providers": ["email"]}', '{}', false, now(), now())
    on conflict (id) do nothing
"""


@dataclass(frozen=True)
class SignedIn:
    """A signed-in user: who, and the access token an app would hold."""

    user_id: uuid.UUID
    email: str | None
    access_token: str
    expires_at: int  # the token's exp (Unix time)


def _jwt_expiry(api: DataApi) -> int:
    config = tomllib.loads((api.rt.root / "supabase" / "config.toml").read_text())
    return int(config.get("auth", {}).get("jwt_expiry", DEFAULT_EXPIRY))


def _parse_user(user: str) -> tuple[uuid.UUID | None, str | None]:
    try:
        return uuid.UUID(user), None
    except ValueError:
        if "@" not in user:
            raise ValueError(f"not a user id or an email address: {user!r}") from None
        return None, user.lower()


def sign_in(
    api: DataApi, user: str, *, email: str | None = None, now: float | None = None
) -> SignedIn:
    """Create the user (by uuid or email) in ``auth.users`` if needed and mint its token.

    ``email`` gives a user created by uuid its address (a user found keeps theirs)."""
    wanted_id, wanted_email = _parse_user(user)
    wanted_email = wanted_email or (email.lower() if email else None)
    with psycopg.connect(api.rt.dsn(api.dbname, ADMIN_USER), autocommit=True) as conn:
        row = conn.execute(_FIND_USER, {"id": wanted_id, "email": wanted_email}).fetchone()
        if row is not None:
            user_id, email = uuid.UUID(str(row[0])), row[1]
        else:
            user_id, email = wanted_id or uuid.uuid4(), wanted_email
            conn.execute(_CREATE_USER, {"id": user_id, "email": email})
    issued = int(time.time() if now is None else now)
    expires = issued + _jwt_expiry(api)
    claims = {
        "iss": f"{api.url}/auth/v1",
        "sub": str(user_id),
        "aud": USER_AUDIENCE,
        "exp": expires,
        "iat": issued,
        "email": email or "",
        "phone": "",
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": {},
        "role": "authenticated",
        "aal": "aal1",
        "amr": [{"method": "password", "timestamp": issued}],
        "session_id": str(uuid.uuid4()),
        "is_anonymous": False,
    }
    return SignedIn(user_id, email, api.sign(claims), expires)


def client(api: DataApi, access_token: str, http: httpx.Client) -> Client:
    """The ``supabase`` client of an app signed in with ``access_token``.

    Many clients may share ``http``: each sends its own headers with every request."""
    options = SyncClientOptions(
        headers={"Authorization": f"Bearer {access_token}"}, httpx_client=http
    )
    return create_client(api.url, api.anon_key, options=options)


def rpc(signed_in: Client, fn: str, params: dict[str, Any] | None = None) -> Any:
    """Call ``api.<fn>`` through the Data API with a signed-in client, as an app does.

    Waits (up to 15 s) for the gateway and for PostgREST's schema cache to have ``fn``, as
    right after ``db start`` and a migration; any other error is raised as it came.
    """
    deadline = time.monotonic() + 15
    while True:
        try:
            return signed_in.schema("api").rpc(fn, params or {}).execute().data
        except (APIError, httpx.TransportError) as exc:
            starting = isinstance(exc, httpx.TransportError) or exc.code in _NOT_LOADED_YET
            if not starting or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def call_api(api: DataApi, access_token: str, fn: str, params: dict[str, Any] | None = None) -> Any:
    """One call of ``api.<fn>`` as the signed-in user, on a connection of its own (see ``rpc``)."""
    with httpx.Client(timeout=30) as http:
        return rpc(client(api, access_token, http), fn, params)
