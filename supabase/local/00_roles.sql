-- Supabase's cluster roles, as a fresh hosted project has them (supabase/postgres init scripts
-- and migrations up to 2026). Runs once per cluster as the bootstrap superuser supabase_admin.
-- Not reproduced: supautils and pg-safeupdate (not packaged for Debian); platform-internal roles.

create role postgres superuser createdb createrole login replication bypassrls
  password 'postgres';

-- The Data API roles. Created NOINHERIT, switched to INHERIT in 2023-05.
create role anon nologin inherit;
create role authenticated nologin inherit;
create role service_role nologin inherit bypassrls;
create role authenticator login noinherit password 'postgres';
grant anon, authenticated, service_role to authenticator;
alter role anon set statement_timeout = '3s';
alter role authenticated set statement_timeout = '8s';
alter role authenticator set statement_timeout = '8s';
alter role authenticator set lock_timeout = '8s';

-- Owner of the auth schema (CREATEROLE was revoked in 2026-08).
create role supabase_auth_admin login noinherit password 'postgres';
alter role supabase_auth_admin set search_path = auth;

grant anon, authenticated, service_role to postgres;
grant pg_monitor, pg_read_all_data, pg_signal_backend to postgres;
alter role postgres set search_path = "$user", public, extensions;

-- On Supabase "postgres" is not a superuser: migrations and tests run with the same limits.
alter role postgres nosuperuser;
