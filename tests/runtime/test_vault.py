"""The local Vault layer against Vault 0.3.1's SQL API and Supabase's grants.

Expected values are transcribed from the reference (supabase/vault 0.3.x SQL and supabase/postgres
after-create.sql), so any drift in supabase/local/40_vault.sql fails here.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Iterator
from datetime import datetime

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.abc import Query

from service.runtime.cluster import ADMIN_USER, Runtime

Conn = psycopg.Connection[tuple[object, ...]]


@pytest.fixture
def admin(rt: Runtime, base_dbname: str) -> Iterator[Conn]:
    """The superuser on the same bootstrap-only database as ``base_conn``."""
    with psycopg.connect(rt.dsn(base_dbname, ADMIN_USER), autocommit=True) as c:
        yield c


def _one(conn: Conn, query: Query, params: tuple[object, ...] = ()) -> object:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def _create(conn: Conn, secret: str, name: str | None = None, description: str = "") -> uuid.UUID:
    sid = _one(conn, "select vault.create_secret(%s, %s, %s)", (secret, name, description))
    assert isinstance(sid, uuid.UUID)
    return sid


def _decrypted(conn: Conn, sid: uuid.UUID) -> object:
    return _one(conn, "select decrypted_secret from vault.decrypted_secrets where id = %s", (sid,))


# --- structure -------------------------------------------------------------------------------

SEARCH_PATH_EMPTY = ['search_path=""']
AEAD_ARGS = (
    "message bytea, additional bytea, key_id bigint, "
    "context bytea DEFAULT '\\x7067736f6469756d'::bytea, nonce bytea DEFAULT NULL::bytea"
)
# name -> (arguments, result, language, security definer, proconfig)
VAULT_API = {
    "create_secret": (
        "new_secret text, new_name text DEFAULT NULL::text, "
        "new_description text DEFAULT ''::text, new_key_id uuid DEFAULT NULL::uuid",
        "uuid",
        "plpgsql",
        True,
        SEARCH_PATH_EMPTY,
    ),
    "update_secret": (
        "secret_id uuid, new_secret text DEFAULT NULL::text, new_name text DEFAULT NULL::text, "
        "new_description text DEFAULT NULL::text, new_key_id uuid DEFAULT NULL::uuid",
        "void",
        "plpgsql",
        True,
        SEARCH_PATH_EMPTY,
    ),
}
VAULT_INTERNAL = {
    "_crypto_aead_det_encrypt": (AEAD_ARGS, "bytea"),
    "_crypto_aead_det_decrypt": (AEAD_ARGS, "bytea"),
    "_crypto_aead_det_noncegen": ("", "bytea"),
}
# Helpers of the local layer only; nobody but their owner may run them.
LOCAL_ONLY = {"_derive_keys", "_aead_header"}


def _functions(conn: Conn) -> dict[str, tuple[object, ...]]:
    rows = conn.execute(
        """
        select p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid),
               l.lanname, p.prosecdef, p.proconfig, pg_get_userbyid(p.proowner)
          from pg_proc p join pg_language l on l.oid = p.prolang
         where p.pronamespace = 'vault'::regnamespace
        """
    ).fetchall()
    return {str(r[0]): tuple(r[1:]) for r in rows}


def test_vault_functions_have_vault_signatures(base_conn: Conn) -> None:
    funcs = _functions(base_conn)
    assert set(funcs) == set(VAULT_API) | set(VAULT_INTERNAL) | LOCAL_ONLY
    for name, (args, result, lang, secdef, config) in VAULT_API.items():
        assert funcs[name] == (args, result, lang, secdef, config, "supabase_admin"), name
    for name, (args, result) in VAULT_INTERNAL.items():
        assert funcs[name][:2] == (args, result), name
        assert funcs[name][4] == SEARCH_PATH_EMPTY, name
        assert funcs[name][5] == "supabase_admin", name
    # The key reader runs as its superuser owner, with no search_path to hijack.
    assert funcs["_derive_keys"][3:] == (True, SEARCH_PATH_EMPTY, "supabase_admin")


def test_secrets_table_matches_vault(base_conn: Conn) -> None:
    cols = base_conn.execute(
        """
        select a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid)
          from pg_attribute a
          left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
         where a.attrelid = 'vault.secrets'::regclass and a.attnum > 0 and not a.attisdropped
         order by a.attnum
        """
    ).fetchall()
    assert cols == [
        ("id", "uuid", True, "gen_random_uuid()"),
        ("name", "text", False, None),
        ("description", "text", True, "''::text"),
        ("secret", "text", True, None),
        ("key_id", "uuid", False, None),
        ("nonce", "bytea", False, "vault._crypto_aead_det_noncegen()"),
        ("created_at", "timestamp with time zone", True, "CURRENT_TIMESTAMP"),
        ("updated_at", "timestamp with time zone", True, "CURRENT_TIMESTAMP"),
    ]
    constraints = base_conn.execute(
        "select conname, pg_get_constraintdef(oid) from pg_constraint "
        "where conrelid = 'vault.secrets'::regclass"
    ).fetchall()
    # key_id is unused in 0.3: no foreign key.
    assert constraints == [("secrets_pkey", "PRIMARY KEY (id)")]
    indexes = base_conn.execute(
        "select pg_get_indexdef(indexrelid) from pg_index "
        "where indrelid = 'vault.secrets'::regclass order by 1"
    ).fetchall()
    assert indexes == [
        (
            "CREATE UNIQUE INDEX secrets_name_idx ON vault.secrets USING btree (name) "
            "WHERE (name IS NOT NULL)",
        ),
        ("CREATE UNIQUE INDEX secrets_pkey ON vault.secrets USING btree (id)",),
    ]
    owner = _one(
        base_conn,
        "select pg_get_userbyid(relowner) from pg_class where oid = 'vault.secrets'::regclass",
    )
    assert owner == "supabase_admin"


def test_decrypted_secrets_view_columns(base_conn: Conn) -> None:
    cols = base_conn.execute(
        "select attname, format_type(atttypid, atttypmod) from pg_attribute "
        "where attrelid = 'vault.decrypted_secrets'::regclass and attnum > 0 order by attnum"
    ).fetchall()
    assert cols == [
        ("id", "uuid"),
        ("name", "text"),
        ("description", "text"),
        ("secret", "text"),
        ("decrypted_secret", "text"),
        ("key_id", "uuid"),
        ("nonce", "bytea"),
        ("created_at", "timestamp with time zone"),
        ("updated_at", "timestamp with time zone"),
    ]


# --- grants ----------------------------------------------------------------------------------

OWNER_FN = "supabase_admin=X/supabase_admin"
GRANTED_FN = {OWNER_FN, "postgres=X*/supabase_admin", "service_role=X/supabase_admin"}
RELATION_ACL = {
    "supabase_admin=arwdDxt/supabase_admin",
    # SELECT, DELETE (after-create) and TRUNCATE, REFERENCES (current projects), all grantable.
    "postgres=r*d*D*x*/supabase_admin",
    "service_role=rd/supabase_admin",
}
EXPECTED_ACLS = {
    "schema vault": {
        "supabase_admin=UC/supabase_admin",
        "postgres=U*/supabase_admin",
        "service_role=U/supabase_admin",
    },
    "vault.secrets": RELATION_ACL,
    "vault.decrypted_secrets": RELATION_ACL,
    "vault.create_secret": GRANTED_FN,
    "vault.update_secret": GRANTED_FN,
    "vault._crypto_aead_det_decrypt": GRANTED_FN,
    # Revoked from PUBLIC and granted to nobody.
    "vault._crypto_aead_det_encrypt": {OWNER_FN},
    "vault._crypto_aead_det_noncegen": {OWNER_FN},
    "vault._derive_keys": {OWNER_FN},
    "vault._aead_header": {OWNER_FN},
}


def test_acls_are_supabase_after_create_grants(base_conn: Conn) -> None:
    acls: dict[str, set[str]] = {}
    schema_acl = _one(base_conn, "select nspacl::text[] from pg_namespace where nspname = 'vault'")
    assert isinstance(schema_acl, list)
    acls["schema vault"] = set(schema_acl)
    for relname, acl in base_conn.execute(
        "select relname, relacl::text[] from pg_class "
        "where relnamespace = 'vault'::regnamespace and relkind in ('r', 'v')"
    ).fetchall():
        acls[f"vault.{relname}"] = set(acl)
    for proname, acl in base_conn.execute(
        "select proname, proacl::text[] from pg_proc where pronamespace = 'vault'::regnamespace"
    ).fetchall():
        acls[f"vault.{proname}"] = set(acl)
    assert acls == EXPECTED_ACLS


TABLE_PRIVS = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


@pytest.mark.parametrize(
    ("role", "usage", "table_privs", "functions"),
    [
        (
            "postgres",
            True,
            {"SELECT", "DELETE", "TRUNCATE", "REFERENCES"},
            {"create_secret", "update_secret", "_crypto_aead_det_decrypt"},
        ),
        (
            "service_role",
            True,
            {"SELECT", "DELETE"},
            {"create_secret", "update_secret", "_crypto_aead_det_decrypt"},
        ),
        ("anon", False, set(), set()),
        ("authenticated", False, set(), set()),
        # NOINHERIT: only what it gets after SET ROLE service_role.
        ("authenticator", False, set(), set()),
    ],
    ids=["postgres", "service_role", "anon", "authenticated", "authenticator"],
)
def test_role_privileges(
    base_conn: Conn, role: str, usage: bool, table_privs: set[str], functions: set[str]
) -> None:
    assert _one(base_conn, "select has_schema_privilege(%s, 'vault', 'USAGE')", (role,)) is usage
    for rel in ("vault.secrets", "vault.decrypted_secrets"):
        for priv in TABLE_PRIVS:
            has = _one(base_conn, "select has_table_privilege(%s, %s, %s)", (role, rel, priv))
            assert has is (priv in table_privs), (role, rel, priv)
    names = base_conn.execute(
        "select proname, has_function_privilege(%s, oid, 'EXECUTE') from pg_proc "
        "where pronamespace = 'vault'::regnamespace",
        (role,),
    ).fetchall()
    assert {str(n) for n, ok in names if ok} == functions


def test_postgres_may_pass_its_grants_on(base_conn: Conn) -> None:
    checks = [
        "has_schema_privilege('postgres', 'vault', 'USAGE WITH GRANT OPTION')",
        "has_table_privilege('postgres', 'vault.secrets', 'SELECT WITH GRANT OPTION')",
        "has_table_privilege('postgres', 'vault.decrypted_secrets', 'DELETE WITH GRANT OPTION')",
        "has_function_privilege('postgres', 'vault.create_secret(text, text, text, uuid)', "
        "'EXECUTE WITH GRANT OPTION')",
    ]
    for check in checks:
        assert _one(base_conn, f"select {check}") is True, check
    assert (
        _one(
            base_conn,
            "select has_table_privilege("
            "'service_role', 'vault.secrets', 'SELECT WITH GRANT OPTION')",
        )
        is False
    )


# --- behaviour -------------------------------------------------------------------------------


def test_round_trip_as_postgres(base_conn: Conn) -> None:
    sid = _create(base_conn, "toss-secret-key 비밀", "toss_key", "Toss API key")
    row = base_conn.execute(
        "select name, description, decrypted_secret, key_id, length(nonce), created_at = updated_at"
        " from vault.decrypted_secrets where id = %s",
        (sid,),
    ).fetchone()
    assert row == ("toss_key", "Toss API key", "toss-secret-key 비밀", None, 16, True)
    # Defaults: no name, empty description; 0.3.1 accepts an empty secret.
    empty = _one(base_conn, "select vault.create_secret('')")
    row = base_conn.execute(
        "select name, description, decrypted_secret from vault.decrypted_secrets where id = %s",
        (empty,),
    ).fetchone()
    assert row == (None, "", "")
    # The decrypt function itself is granted, as on Supabase.
    direct = _one(
        base_conn,
        "select convert_from(vault._crypto_aead_det_decrypt(decode(secret, 'base64'), "
        "convert_to(id::text, 'utf8'), 0, 'pgsodium', nonce), 'utf8') "
        "from vault.secrets where id = %s",
        (sid,),
    )
    assert direct == "toss-secret-key 비밀"


def test_round_trip_as_service_role(base_conn: Conn) -> None:
    base_conn.execute("set role service_role")
    assert _one(base_conn, "select current_user") == "service_role"
    sid = _create(base_conn, "s3cret", "svc")
    assert _decrypted(base_conn, sid) == "s3cret"
    base_conn.execute("select vault.update_secret(%s, 'rotated')", (sid,))
    assert _decrypted(base_conn, sid) == "rotated"
    with pytest.raises(errors.InsufficientPrivilege):
        base_conn.execute("insert into vault.secrets (secret) values ('x')")
    with pytest.raises(errors.InsufficientPrivilege):
        base_conn.execute("update vault.secrets set name = 'x' where id = %s", (sid,))
    base_conn.execute("delete from vault.secrets where id = %s", (sid,))
    assert _one(base_conn, "select count(*) from vault.decrypted_secrets") == 0


def _row(conn: Conn, sid: uuid.UUID) -> tuple[tuple[object, ...], datetime, datetime]:
    """(name, description, secret, decrypted_secret, nonce), created_at, updated_at."""
    row = conn.execute(
        "select name, description, secret, decrypted_secret, nonce, created_at, updated_at "
        "from vault.decrypted_secrets where id = %s",
        (sid,),
    ).fetchone()
    assert row is not None
    created, updated = row[5], row[6]
    assert isinstance(created, datetime)
    assert isinstance(updated, datetime)
    return row[:5], created, updated


def test_update_secret_changes_only_non_null_arguments(base_conn: Conn) -> None:
    sid = _create(base_conn, "v1", "toss_key", "first")
    (_, _, ct, _, nonce), created, updated = _row(base_conn, sid)

    base_conn.execute("select vault.update_secret(%s, new_description => 'second')", (sid,))
    values, created_after, updated_after = _row(base_conn, sid)
    assert values == ("toss_key", "second", ct, "v1", nonce)
    assert created_after == created
    assert updated_after > updated
    updated = updated_after

    base_conn.execute("select vault.update_secret(%s, new_name => 'toss_key_v2')", (sid,))
    values, _, updated_after = _row(base_conn, sid)
    assert values == ("toss_key_v2", "second", ct, "v1", nonce)
    assert updated_after > updated
    updated = updated_after

    base_conn.execute("select vault.update_secret(%s, 'v2')", (sid,))
    (name, desc, new_ct, plain, new_nonce), _, updated_after = _row(base_conn, sid)
    assert (name, desc, plain, new_nonce) == ("toss_key_v2", "second", "v2", nonce)
    assert new_ct != ct, "a new secret must be re-encrypted"
    assert updated_after > updated
    updated = updated_after

    # All arguments NULL: only updated_at moves.
    base_conn.execute("select vault.update_secret(%s)", (sid,))
    values, created_after, updated_after = _row(base_conn, sid)
    assert values == ("toss_key_v2", "second", new_ct, "v2", nonce)
    assert created_after == created
    assert updated_after > updated


def test_update_secret_ignores_unknown_ids(base_conn: Conn) -> None:
    sid = _create(base_conn, "keep", "k")
    before = base_conn.execute("select * from vault.secrets").fetchall()
    base_conn.execute("select vault.update_secret(%s, 'x', 'y', 'z')", (uuid.uuid4(),))
    assert base_conn.execute("select * from vault.secrets").fetchall() == before
    assert _decrypted(base_conn, sid) == "keep"


def test_names_are_unique_but_may_be_null(base_conn: Conn) -> None:
    _create(base_conn, "a", "dup")
    with pytest.raises(errors.UniqueViolation) as exc:
        _create(base_conn, "b", "dup")
    assert exc.value.diag.constraint_name == "secrets_name_idx"
    other = _create(base_conn, "c", "other")
    with pytest.raises(errors.UniqueViolation):
        base_conn.execute("select vault.update_secret(%s, new_name => 'dup')", (other,))
    _create(base_conn, "d")
    _create(base_conn, "e")
    assert _one(base_conn, "select count(*) from vault.secrets where name is null") == 2


def test_null_description_violates_not_null(base_conn: Conn) -> None:
    with pytest.raises(errors.NotNullViolation) as exc:
        base_conn.execute("select vault.create_secret('x', 'n', new_description => null)")
    assert exc.value.diag.column_name == "description"
    assert _one(base_conn, "select count(*) from vault.secrets") == 0


def test_direct_writes_are_refused_for_postgres(base_conn: Conn) -> None:
    sid = _create(base_conn, "x", "n")
    statements = [
        "insert into vault.secrets (secret, name) values ('plain', 'direct')",
        "insert into vault.decrypted_secrets (secret) values ('plain')",
        "update vault.secrets set description = 'changed'",
    ]
    for statement in statements:
        with pytest.raises(errors.InsufficientPrivilege):
            base_conn.execute(statement)
    # Even a row that could be written would need the nonce generator, which is not granted.
    with pytest.raises(errors.InsufficientPrivilege):
        base_conn.execute("select vault._crypto_aead_det_noncegen()")
    with pytest.raises(errors.InsufficientPrivilege):
        base_conn.execute("select vault._crypto_aead_det_encrypt('x', 'y', 0)")
    assert _decrypted(base_conn, sid) == "x"
    base_conn.execute("delete from vault.secrets where id = %s", (sid,))
    assert _one(base_conn, "select count(*) from vault.secrets") == 0


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_api_roles_cannot_touch_vault(base_conn: Conn, role: str) -> None:
    _create(base_conn, "x", "n")
    base_conn.execute(sql.SQL("set role {}").format(sql.Identifier(role)))
    for statement in [
        "select decrypted_secret from vault.decrypted_secrets",
        "select secret from vault.secrets",
        "select vault.create_secret('y')",
        "select vault.update_secret(gen_random_uuid(), 'y')",
    ]:
        with pytest.raises(errors.InsufficientPrivilege):
            base_conn.execute(statement)


def test_stored_secret_is_ciphertext_unique_per_row(base_conn: Conn) -> None:
    plain = "sk_live_0123456789abcdef"
    a = _create(base_conn, plain, "a")
    b = _create(base_conn, plain, "b")
    rows = dict(
        base_conn.execute(
            "select id, secret from vault.secrets where id in (%s, %s)", (a, b)
        ).fetchall()
    )
    for ct in rows.values():
        assert isinstance(ct, str)
        # encode(…, 'base64') wraps lines at 76 characters, as on Supabase.
        raw = base64.b64decode(ct.replace("\n", ""), validate=True)
        assert plain not in ct
        assert plain.encode() not in raw
        assert len(raw) > len(plain)
    assert rows[a] != rows[b], "same plaintext, different rows: ciphertexts must differ"
    assert _decrypted(base_conn, a) == _decrypted(base_conn, b) == plain


def test_encryption_is_deterministic_and_bound_to_its_inputs(admin: Conn) -> None:
    def enc(message: bytes, additional: bytes | None, nonce: bytes | None) -> bytes:
        out = _one(
            admin,
            "select vault._crypto_aead_det_encrypt(%s, %s, 0, 'pgsodium', %s)",
            (message, additional, nonce),
        )
        assert isinstance(out, bytes)
        return out

    def dec(message: bytes, additional: bytes | None, nonce: bytes | None) -> object:
        return _one(
            admin,
            "select vault._crypto_aead_det_decrypt(%s, %s, 0, 'pgsodium', %s)",
            (message, additional, nonce),
        )

    nonce = bytes(range(16))
    ct = enc(b"hello", b"ad", nonce)
    assert ct == enc(b"hello", b"ad", nonce)
    assert ct != enc(b"hello", b"ad", bytes(16))
    assert ct != enc(b"hello", b"ae", nonce)
    assert dec(ct, b"ad", nonce) == b"hello"
    # Without a nonce or additional data, as libsodium's deterministic mode allows.
    bare = enc(b"hello", None, None)
    assert dec(bare, None, None) == b"hello"
    for wrong_ad, wrong_nonce in [(b"ae", nonce), (b"ad", bytes(16)), (b"ad", None)]:
        with pytest.raises(errors.DataException, match="invalid ciphertext"):
            dec(ct, wrong_ad, wrong_nonce)
    other_key = _one(
        admin, "select vault._crypto_aead_det_encrypt('hello', 'ad', 1, 'pgsodium', %s)", (nonce,)
    )
    assert other_key != ct
    with pytest.raises(errors.DataException, match="invalid ciphertext"):
        _one(
            admin, "select vault._crypto_aead_det_decrypt(%s, 'ad', 1, 'pgsodium', %s)", (ct, nonce)
        )


def test_argument_errors_match_vault(admin: Conn) -> None:
    cases = [
        ("select vault._crypto_aead_det_encrypt(null, 'a', 0)", "message cannot be NULL"),
        ("select vault._crypto_aead_det_encrypt('m', 'a', null)", "key id cannot be NULL"),
        ("select vault._crypto_aead_det_encrypt('m', 'a', 0, null)", "key context cannot be NULL"),
        (
            "select vault._crypto_aead_det_encrypt('m', 'a', 0, 'pgsodium', 'short')",
            "invalid nonce",
        ),
        (
            "select vault._crypto_aead_det_encrypt('m', 'a', 0, 'toolongcontext')",
            "context must be 8 bytes",
        ),
        ("select vault._crypto_aead_det_decrypt('\\x00', 'a', 0)", "invalid message"),
    ]
    for statement, message in cases:
        with pytest.raises(errors.DataException, match=message):
            admin.execute(statement)


def test_tampered_or_moved_ciphertext_does_not_decrypt(base_conn: Conn, admin: Conn) -> None:
    a = _create(base_conn, "secret-a", "a")
    b = _create(base_conn, "secret-b", "b")
    ct_a = _one(admin, "select secret from vault.secrets where id = %s", (a,))
    assert isinstance(ct_a, str)
    raw = bytearray(base64.b64decode(ct_a))
    raw[20] ^= 0x01
    admin.execute(
        "update vault.secrets set secret = %s where id = %s",
        (base64.b64encode(bytes(raw)).decode(), a),
    )
    with pytest.raises(errors.DataException, match="invalid ciphertext"):
        _decrypted(base_conn, a)
    # update_secret reads the current value first, so a damaged row cannot be rotated silently.
    with pytest.raises(errors.DataException, match="invalid ciphertext"):
        base_conn.execute("select vault.update_secret(%s, 'new')", (a,))

    # B's ciphertext and nonce copied onto A: the row id is the additional data, so it fails.
    admin.execute(
        "update vault.secrets a set secret = b.secret, nonce = b.nonce "
        "from vault.secrets b where a.id = %s and b.id = %s",
        (a, b),
    )
    with pytest.raises(errors.DataException, match="invalid ciphertext"):
        _decrypted(base_conn, a)
    # A changed nonce alone fails too.
    admin.execute(
        "update vault.secrets set nonce = extensions.gen_random_bytes(16) where id = %s", (b,)
    )
    with pytest.raises(errors.DataException, match="invalid ciphertext"):
        _decrypted(base_conn, b)


def test_multi_row_inserts_get_distinct_nonces(admin: Conn) -> None:
    admin.execute("insert into vault.secrets (secret) select 'x' from generate_series(1, 50)")
    assert _one(admin, "select count(distinct nonce) from vault.secrets") == 50


# --- the root key ----------------------------------------------------------------------------


def _root_key(admin: Conn) -> str:
    key = _one(admin, "select btrim(pg_read_file('vault_root.key'), E' \\n')")
    assert isinstance(key, str)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    return key


def test_root_key_is_in_no_table_or_setting(base_conn: Conn, admin: Conn) -> None:
    key = _root_key(admin)
    sid = _create(base_conn, "x", "n")
    assert _decrypted(base_conn, sid) == "x"
    # Settings of the session that just used the key.
    assert (
        _one(
            base_conn,
            "select count(*) from pg_settings where setting ilike '%%' || %s || '%%'",
            (key,),
        )
        == 0
    )
    # Every table and materialized view of the database, catalogs included; bytea renders as
    # hex, so this also finds the raw key bytes.
    relations = admin.execute(
        "select oid::regclass::text from pg_class where relkind in ('r', 'm')"
    ).fetchall()
    assert len(relations) > 60
    for (rel,) in relations:
        found = _one(
            admin,
            sql.SQL("select count(*) from {} t where t::text ilike '%%' || %s || '%%'").format(
                sql.SQL(str(rel))
            ),
            (key,),
        )
        assert found == 0, rel


def test_postgres_cannot_read_the_root_key(base_conn: Conn, admin: Conn) -> None:
    _root_key(admin)  # the file is there
    denied = [
        "select pg_read_file('vault_root.key')",
        "select pg_read_binary_file('vault_root.key')",
        "select vault._derive_keys(0, 'pgsodium')",
        "select vault._crypto_aead_det_encrypt('m', 'a', 0)",
    ]
    for role in ("postgres", "service_role"):
        base_conn.execute(sql.SQL("set role {}").format(sql.Identifier(role)))
        for statement in denied:
            with pytest.raises(errors.InsufficientPrivilege):
                base_conn.execute(statement)
    has = _one(
        base_conn,
        "select bool_or(pg_has_role('postgres', r, 'MEMBER')) from unnest(array["
        "'pg_read_server_files', 'pg_execute_server_program', 'supabase_admin']) r",
    )
    assert has is False
