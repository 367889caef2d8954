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
