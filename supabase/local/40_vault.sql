-- Supabase Vault 0.3.1's SQL API, for clusters where the supabase_vault extension is missing.
-- Runs as supabase_admin in the base template, so every object is owned by supabase_admin, as the
-- extension's objects are on Supabase.
--
-- Callers see exactly Vault's surface: vault.secrets, vault.decrypted_secrets,
-- vault.create_secret, vault.update_secret and the three vault._crypto_aead_det_* functions, with
-- 0.3.1's signatures, defaults, SECURITY DEFINER/search_path settings, error texts and Supabase's
-- grants (ansible .../supabase_vault/after-create.sql). As on Supabase, postgres and service_role
-- can read and delete but not INSERT/UPDATE the table: secrets are written with the functions.
--
-- The cipher differs inside. Real Vault runs libsodium's deterministic XChaCha20-SIV in C with a
-- subkey derived (BLAKE2b KDF) from a root key the postmaster loads at start. Plain SQL only has
-- pgcrypto, so here:
--   subkey  = HMAC-SHA256(root key, context || key_id), then one key each for IV, AES, MAC;
--   iv      = first 16 bytes of HMAC(siv key, additional || nonce || message)  (synthetic IV)
--   ct      = AES-256-CBC(aes key, iv, message)
--   output  = iv || ct || HMAC(mac key, additional || nonce || iv || ct)
-- This keeps the properties callers rely on: authenticated (a changed byte, or ciphertext moved
-- to another row, whose id is the additional data, fails to decrypt), deterministic for the same
-- inputs like a SIV mode, and a nonce reused by update_secret only reveals equal plaintexts. The
-- tag is checked before AES runs, so padding errors are never observable. The ciphertext layout
-- differs from libsodium's, which matters to nobody: only these functions read it, and
-- ciphertext is bound to its cluster's root key, so it never moves to or from Supabase anyway.
--
-- The root key is the file vault_root.key in the data directory (written at initdb, mode 0600).
-- Only vault._derive_keys reads it, as supabase_admin; nobody else may execute that function, and
-- the key is never cached in a setting or a table. The encrypt/decrypt functions are therefore
-- SECURITY DEFINER here (the C originals need not be: the key sits in process memory).

create schema vault;

-- Derives the per-purpose keys for (key_id, context) from the root key. Owner only.
create function vault._derive_keys(
  key_id bigint,
  context bytea,
  out siv_key bytea,
  out aes_key bytea,
  out mac_key bytea
)
language plpgsql
stable
security definer
set search_path = ''
as $$
declare
  root_hex text := pg_catalog.btrim(pg_catalog.pg_read_file('vault_root.key'), E' \t\r\n');
  subkey bytea;
begin
  -- Like Vault's "invalid secret key": 64 hex characters or nothing. Never echo the file.
  if root_hex !~ '^[0-9a-fA-F]{64}$' then
    raise exception 'vault: invalid secret key in vault_root.key' using errcode = 'XX000';
  end if;
  -- context is exactly 8 bytes (checked by the callers), key_id 8 bytes: the input is unambiguous.
  subkey := extensions.hmac(context || pg_catalog.int8send(key_id),
                            pg_catalog.decode(root_hex, 'hex'), 'sha256'::text);
  siv_key := extensions.hmac('vault-siv'::bytea, subkey, 'sha256'::text);
  aes_key := extensions.hmac('vault-aes'::bytea, subkey, 'sha256'::text);
  mac_key := extensions.hmac('vault-mac'::bytea, subkey, 'sha256'::text);
end
$$;
comment on function vault._derive_keys(bigint, bytea) is
  'Internal: derives the Vault subkeys from the root key file. Owner (supabase_admin) only.';

-- Length-prefixed additional data and nonce, so that no two different inputs frame alike.
create function vault._aead_header(additional bytea, nonce bytea)
returns bytea
language sql
immutable
set search_path = ''
as $$
  select pg_catalog.int4send(coalesce(pg_catalog.length(additional), 0))
      || coalesce(additional, ''::bytea)
      || pg_catalog.int4send(coalesce(pg_catalog.length(nonce), 0))
      || coalesce(nonce, ''::bytea)
$$;
comment on function vault._aead_header(bytea, bytea) is
  'Internal: framing of additional data and nonce for the Vault AEAD. Owner only.';

create function vault._crypto_aead_det_encrypt(
  message bytea,
  additional bytea,
  key_id bigint,
  context bytea = 'pgsodium',
  nonce bytea = NULL
)
returns bytea
language plpgsql
immutable
security definer
set search_path = ''
as $$
declare
  k record;
  header bytea;
  iv bytea;
  ct bytea;
begin
  -- Argument checks and messages as in Vault's C function (SQLSTATE 22000).
  if message is null then
    raise exception 'pgsodium_crypto_aead_det_encrypt_by_id: message cannot be NULL'
      using errcode = 'data_exception';
  end if;
  if key_id is null then
    raise exception 'pgsodium_crypto_aead_det_encrypt_by_id: key id cannot be NULL'
      using errcode = 'data_exception';
  end if;
  if context is null then
    raise exception 'pgsodium_crypto_aead_det_encrypt_by_id: key context cannot be NULL'
      using errcode = 'data_exception';
  end if;
  if nonce is not null and pg_catalog.length(nonce) <> 16 then
    raise exception 'pgsodium_crypto_aead_det_encrypt_by_id: invalid nonce'
      using errcode = 'data_exception';
  end if;
  if pg_catalog.length(context) <> 8 then
    raise exception 'pgsodium_derive_helper: crypto_kdf_derive_from_key: context must be 8 bytes'
      using errcode = 'data_exception';
  end if;

  select * into k from vault._derive_keys(key_id, context);
  header := vault._aead_header(additional, nonce);
  iv := pg_catalog.substr(
    extensions.hmac(header || message, k.siv_key, 'sha256'::text), 1, 16);
  ct := extensions.encrypt_iv(message, k.aes_key, iv, 'aes-cbc/pad:pkcs'::text);
  return iv || ct || extensions.hmac(header || iv || ct, k.mac_key, 'sha256'::text);
end
$$;
comment on function vault._crypto_aead_det_encrypt(bytea, bytea, bigint, bytea, bytea) is
  'Vault internal: authenticated deterministic encryption under the root key. Owner only.';

create function vault._crypto_aead_det_decrypt(
  message bytea,
  additional bytea,
  key_id bigint,
  context bytea = 'pgsodium',
  nonce bytea = NULL
)
returns bytea
language plpgsql
immutable
security definer
set search_path = ''
as $$
declare
  k record;
  header bytea;
  n integer;
  iv bytea;
  ct bytea;
  tag bytea;
  expected bytea;
  plain bytea;
begin
  if message is null then
    raise exception 'pgsodium_crypto_aead_det_decrypt_by_id: message cannot be NULL'
      using errcode = 'data_exception';
  end if;
  if key_id is null then
    raise exception 'pgsodium_crypto_aead_det_decrypt_by_id: key id cannot be NULL'
      using errcode = 'data_exception';
  end if;
  if context is null then
    raise exception 'pgsodium_crypto_aead_det_decrypt_by_id: key context cannot be NULL'
      using errcode = 'data_exception';
  end if;
  if nonce is not null and pg_catalog.length(nonce) <> 16 then
    raise exception 'pgsodium_crypto_aead_det_decrypt_by_id: invalid nonce'
      using errcode = 'data_exception';
  end if;
  n := pg_catalog.length(message);
  -- iv (16) + at least one AES block (16) + tag (32), whole blocks only.
  if n < 64 or (n - 48) % 16 <> 0 then
    raise exception 'pgsodium_crypto_aead_det_decrypt_by_id: invalid message'
      using errcode = 'data_exception';
  end if;
  if pg_catalog.length(context) <> 8 then
    raise exception 'pgsodium_derive_helper: crypto_kdf_derive_from_key: context must be 8 bytes'
      using errcode = 'data_exception';
  end if;

  select * into k from vault._derive_keys(key_id, context);
  header := vault._aead_header(additional, nonce);
  iv := pg_catalog.substr(message, 1, 16);
  ct := pg_catalog.substr(message, 17, n - 48);
  tag := pg_catalog.substr(message, n - 31, 32);
  expected := extensions.hmac(header || iv || ct, k.mac_key, 'sha256'::text);
  -- Compare MACs of the tags: the comparison's timing then says nothing about the tag.
  if extensions.hmac(tag, k.mac_key, 'sha256'::text)
     <> extensions.hmac(expected, k.mac_key, 'sha256'::text) then
    raise exception 'pgsodium_crypto_aead_det_decrypt_by_id: invalid ciphertext'
      using errcode = 'data_exception';
  end if;
  plain := extensions.decrypt_iv(ct, k.aes_key, iv, 'aes-cbc/pad:pkcs'::text);
  -- The tag already proves integrity; a synthetic IV that does not match would mean a bug.
  if pg_catalog.substr(
       extensions.hmac(header || plain, k.siv_key, 'sha256'::text), 1, 16) <> iv then
    raise exception 'pgsodium_crypto_aead_det_decrypt_by_id: invalid ciphertext'
      using errcode = 'data_exception';
  end if;
  return plain;
end
$$;
comment on function vault._crypto_aead_det_decrypt(bytea, bytea, bigint, bytea, bytea) is
  'Vault internal: verifies and decrypts what _crypto_aead_det_encrypt wrote; raises 22000 '
  '"invalid ciphertext" when the data, additional data, nonce or key do not match.';

-- Volatile, unlike the C original's IMMUTABLE label: an immutable column default may be folded
-- into one value for a multi-row INSERT, and every row must get its own nonce.
create function vault._crypto_aead_det_noncegen()
returns bytea
language sql
volatile
set search_path = ''
as $$
  select extensions.gen_random_bytes(16)
$$;
comment on function vault._crypto_aead_det_noncegen() is
  'Vault internal: a random 16-byte nonce (column default of vault.secrets.nonce).';

create table vault.secrets (
  id uuid primary key default gen_random_uuid(),
  name text,
  description text not null default '',
  secret text not null,
  key_id uuid,
  nonce bytea default vault._crypto_aead_det_noncegen(),
  created_at timestamptz not null default CURRENT_TIMESTAMP,
  updated_at timestamptz not null default CURRENT_TIMESTAMP
);
comment on table vault.secrets is
  'Table with encrypted `secret` column for storing sensitive information on disk.';

-- Auto-named secrets_name_idx, as in Vault.
create unique index on vault.secrets using btree (name) where name is not null;

create view vault.decrypted_secrets as
select s.id,
  s.name,
  s.description,
  s.secret,
  convert_from(
    vault._crypto_aead_det_decrypt(
      message := decode(s.secret, 'base64'::text),
      additional := convert_to(s.id::text, 'utf8'),
      key_id := 0,
      context := 'pgsodium'::bytea,
      nonce := s.nonce
    ),
    'utf8'::name
  ) as decrypted_secret,
  s.key_id,
  s.nonce,
  s.created_at,
  s.updated_at
from vault.secrets s;

-- Bodies as in Vault 0.3.1: insert the plaintext, then overwrite it with the ciphertext (the row
-- id, the additional data, exists only after the insert) in the same call.
create function vault.create_secret(
  new_secret text,
  new_name text = NULL,
  new_description text = '',
  -- unused
  new_key_id uuid = NULL
)
returns uuid
security definer
language plpgsql
set search_path = ''
as $$
declare
  rec record;
begin
  insert into vault.secrets (secret, name, description)
  values (
    new_secret,
    new_name,
    new_description
  )
  returning * into rec;
  update vault.secrets s
  set secret = encode(vault._crypto_aead_det_encrypt(
    message := convert_to(rec.secret, 'utf8'),
    additional := convert_to(s.id::text, 'utf8'),
    key_id := 0,
    context := 'pgsodium'::bytea,
    nonce := rec.nonce
  ), 'base64')
  where id = rec.id;
  return rec.id;
end
$$;
comment on function vault.create_secret(text, text, text, uuid) is
  'Stores a secret encrypted and returns its id. Callers: postgres, service_role. Raises 23505 '
  'for a taken name.';

-- Reads the current value first (as Vault does), so an undecryptable row cannot be updated.
create function vault.update_secret(
  secret_id uuid,
  new_secret text = NULL,
  new_name text = NULL,
  new_description text = NULL,
  -- unused
  new_key_id uuid = NULL
)
returns void
security definer
language plpgsql
set search_path = ''
as $$
declare
  decrypted_secret text :=
    (select decrypted_secret from vault.decrypted_secrets where id = secret_id);
begin
  update vault.secrets s
  set
    secret = case when new_secret is null then s.secret
                  else encode(vault._crypto_aead_det_encrypt(
                    message := convert_to(new_secret, 'utf8'),
                    additional := convert_to(s.id::text, 'utf8'),
                    key_id := 0,
                    context := 'pgsodium'::bytea,
                    nonce := s.nonce
                  ), 'base64') end,
    name = coalesce(new_name, s.name),
    description = coalesce(new_description, s.description),
    updated_at = now()
  where s.id = secret_id;
end
$$;
comment on function vault.update_secret(uuid, text, text, text, uuid) is
  'Changes the non-NULL arguments of a secret and its updated_at; no-op for an unknown id. '
  'Callers: postgres, service_role.';

revoke all on function
  vault._derive_keys(bigint, bytea),
  vault._aead_header(bytea, bytea),
  vault._crypto_aead_det_encrypt(bytea, bytea, bigint, bytea, bytea),
  vault._crypto_aead_det_decrypt(bytea, bytea, bigint, bytea, bytea),
  vault._crypto_aead_det_noncegen(),
  vault.create_secret(text, text, text, uuid),
  vault.update_secret(uuid, text, text, text, uuid)
from public;

-- Supabase's after-create grants, verbatim. Reading the view needs EXECUTE on the decrypt
-- function too: functions in a view are checked against the querying role.
grant usage on schema vault to postgres with grant option;
grant select, delete on vault.secrets, vault.decrypted_secrets to postgres with grant option;
grant execute on function vault.create_secret, vault.update_secret, vault._crypto_aead_det_decrypt
  to postgres with grant option;
-- What current projects have on top (supabase/postgres#1606's grants for postgres).
grant truncate, references on vault.secrets, vault.decrypted_secrets to postgres
  with grant option;

grant usage on schema vault to service_role;
grant select, delete on vault.secrets, vault.decrypted_secrets to service_role;
grant execute on function vault.create_secret, vault.update_secret, vault._crypto_aead_det_decrypt
  to service_role;
