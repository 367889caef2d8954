-- What every fresh Supabase database has before the project's migrations: the extensions
-- schema, pgcrypto and uuid-ossp in it, pg_cron with Supabase's grants, and the public schema's
-- grants. Runs as supabase_admin in the base template.

create schema if not exists extensions;
grant usage on schema extensions to postgres, anon, authenticated, service_role;

create extension if not exists pgcrypto with schema extensions;
create extension if not exists "uuid-ossp" with schema extensions;

-- pg_cron: Supabase forces schema pg_catalog; the cron schema comes from the extension script.
create extension if not exists pg_cron with schema pg_catalog;
grant usage on schema cron to postgres with grant option;
grant execute on all functions in schema cron to postgres with grant option;
-- Supabase revoked writes on cron.job in 2023-10: use cron.schedule / cron.unschedule.
grant select on cron.job to postgres with grant option;
grant select, insert, update, delete, truncate, references on cron.job_run_details
  to postgres with grant option;

-- PG 15 makes the database owner (postgres) the owner of public; the API roles get USAGE.
-- New objects in public are not granted to the API roles by default (Supabase's default for
-- all projects since 2026-10-30), so migrations must grant explicitly.
grant usage on schema public to postgres, anon, authenticated, service_role;

-- PostgREST's schema cache follows DDL: Supabase's event triggers send NOTIFY pgrst after every
-- schema change, so a migration is visible through the Data API at once.
create or replace function extensions.pgrst_ddl_watch() returns event_trigger
  language plpgsql
as $$
begin
  perform pg_catalog.pg_notify('pgrst', 'reload schema');
end;
$$;
create or replace function extensions.pgrst_drop_watch() returns event_trigger
  language plpgsql
as $$
begin
  perform pg_catalog.pg_notify('pgrst', 'reload schema');
end;
$$;
create event trigger pgrst_ddl_watch on ddl_command_end
  execute procedure extensions.pgrst_ddl_watch();
create event trigger pgrst_drop_watch on sql_drop
  execute procedure extensions.pgrst_drop_watch();

-- Local Data API only (PostgREST's db-pre-request): a user's token must carry exp and
-- aud "authenticated", as Supabase Auth's always do; PostgREST alone accepts a token without
-- them. PT401 makes PostgREST answer 401.
create or replace function extensions.local_api_check_token() returns void
  language plpgsql
  stable
  set search_path = ''
as $$
declare
  claims jsonb := nullif(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb;
  aud jsonb := claims -> 'aud';
begin
  if claims ->> 'role' is distinct from 'authenticated' then
    return;
  end if;
  if claims -> 'exp' is null
     or aud is null
     or not (aud = '"authenticated"'::jsonb
             or (pg_catalog.jsonb_typeof(aud) = 'array' and aud ? 'authenticated')) then
    raise exception 'JWT must carry "exp" and "aud": "authenticated"'
      using errcode = 'PT401', hint = 'sign in through Supabase Auth for a user token';
  end if;
end;
$$;
revoke execute on function extensions.local_api_check_token() from public;
grant execute on function extensions.local_api_check_token()
  to anon, authenticated, service_role;
comment on function extensions.local_api_check_token() is
  'Local Data API pre-request check: user tokens need exp and aud authenticated (401 otherwise).';
