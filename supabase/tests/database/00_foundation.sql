-- The platform pieces the product stands on, and the product's schemas with their privileges.
begin;
select plan(19);

select has_extension('pg_cron', 'pg_cron is installed');
select has_extension('pgcrypto', 'pgcrypto is installed');
select has_schema('net', 'pg_net''s schema net exists');
select has_schema('vault', 'Vault''s schema vault exists');
select has_function('net', 'http_post', array['text', 'jsonb', 'jsonb', 'jsonb', 'integer'],
  'net.http_post(url, body, params, headers, timeout_milliseconds)');
select has_function('vault', 'create_secret', array['text', 'text', 'text', 'uuid'],
  'vault.create_secret(new_secret, new_name, new_description, new_key_id)');
select has_function('auth', 'uid', 'auth.uid()');
select has_function('auth', 'jwt', 'auth.jwt()');

select has_schema('billing', 'private schema billing');
select has_schema('api', 'exposed schema api');
select has_schema('analytics', 'analysts'' schema analytics');

select ok(not has_schema_privilege('anon', 'billing', 'usage'), 'anon cannot use billing');
select ok(not has_schema_privilege('authenticated', 'billing', 'usage'),
  'authenticated cannot use billing');
select ok(not has_schema_privilege('anon', 'api', 'usage'), 'anon cannot use api');
select ok(has_schema_privilege('authenticated', 'api', 'usage'), 'authenticated can use api');
select ok(not has_schema_privilege('anon', 'analytics', 'usage'), 'anon cannot use analytics');
select ok(not has_schema_privilege('public', 'billing', 'create'), 'nobody else creates in billing');

select is(current_setting('TimeZone'), 'UTC', 'the server runs in UTC as Supabase does');
select is((select rolsuper from pg_roles where rolname = current_user), false,
  'tests run as a non-superuser, as migrations do on Supabase');

select * from finish();
rollback;
