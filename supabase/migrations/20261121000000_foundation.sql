-- Foundation: the product's schemas, after checking that the platform pieces it stands on exist.
-- Runs unchanged on Supabase (CLI db push / alembic) and on the local runtime.

do $$
begin
  if not exists (select 1 from pg_extension where extname = 'pg_cron') then
    raise exception 'pg_cron is not installed in this database'
      using errcode = 'P0001',
            hint = 'Supabase: Database > Extensions > pg_cron (create extension pg_cron with schema pg_catalog).';
  end if;
  if to_regprocedure('net.http_post(text,jsonb,jsonb,jsonb,integer)') is null then
    raise exception 'pg_net (schema net) is not installed in this database'
      using errcode = 'P0001',
            hint = 'Supabase: create extension pg_net with schema extensions.';
  end if;
  if to_regprocedure('vault.create_secret(text,text,text,uuid)') is null
     or to_regclass('vault.decrypted_secrets') is null then
    raise exception 'Supabase Vault (schema vault) is not installed in this database'
      using errcode = 'P0001',
            hint = 'Supabase: create extension supabase_vault with schema vault.';
  end if;
end
$$;

-- billing: private tables, types and internal functions. api: what subscribers may call.
-- analytics: read-only views for analysts.
create schema if not exists billing;
create schema if not exists api;
create schema if not exists analytics;

revoke all on schema billing from public;
revoke all on schema api from public;
revoke all on schema analytics from public;

grant usage on schema api to authenticated;

comment on schema billing is 'saju-billing: private billing state; reached only through functions.';
comment on schema api is 'saju-billing: functions a signed-in subscriber may call (RPC).';
comment on schema analytics is 'saju-billing: read-only views for analysts.';
