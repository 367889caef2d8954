-- Helpers shared by the pgTAP files, in schema tests: identity switches, running SQL as the
-- service, and Toss-shaped fixtures. Like basejump's supabase_test_helpers, this file is not rolled
-- back: `supabase test db` runs every file in name order in one database, so what it creates is
-- there for the files after it (tests/test_pgtap.py runs it before each file). Idempotent, so a
-- second run changes nothing. Test-only: no migration creates or uses schema tests.
select plan(1);

create schema if not exists tests authorization postgres;

-- Identity switches for the rest of the transaction: a subscriber (role authenticated with JWT
-- claims, as PostgREST sets them), the service role, or back to the owner.
create or replace function tests.as_user(sub text) returns void language plpgsql as $$
begin
  perform pg_catalog.set_config('request.jwt.claims',
                                pg_catalog.json_build_object('sub', sub, 'role', 'authenticated',
                                                             'email', sub || '@example.com')::text, true);
  perform pg_catalog.set_config('role', 'authenticated', true);
end $$;
create or replace function tests.as_service() returns void language plpgsql as $$
begin
  perform pg_catalog.set_config('request.jwt.claims', '', true);
  perform pg_catalog.set_config('role', 'billing_service', true);
end $$;
create or replace function tests.as_owner() returns void language plpgsql as $$
begin
  perform pg_catalog.set_config('request.jwt.claims', '', true);
  perform pg_catalog.set_config('role', 'none', true);
end $$;

-- Runs SQL (format() with args) as billing_service; assertions run as postgres, since pgTAP lives
-- in schema extensions, which the service role cannot use.
create or replace function tests.svc(sql text, variadic args text[] default '{}') returns jsonb
language plpgsql as $$
declare
  r jsonb;
begin
  perform tests.as_service();
  execute pg_catalog.format(sql, variadic args) into r;
  perform tests.as_owner();
  return r;
end $$;

-- A Toss Payment object as the charge or a lookup returns it.
create or replace function tests.payment(order_id text, amount bigint) returns jsonb language sql as $$
  select pg_catalog.jsonb_build_object(
    'paymentKey', 'pk_' || order_id, 'orderId', order_id, 'status', 'DONE', 'method', '카드',
    'totalAmount', amount, 'balanceAmount', amount, 'approvedAt', '2028-01-10T10:00:00+09:00',
    'secret', 'ps_' || pg_catalog.left(order_id, 20), 'lastTransactionKey', 'tx_' || order_id,
    'receipt', pg_catalog.jsonb_build_object('url', 'https://receipt.example/' || order_id), 'cancels', null)
$$;

-- A subscriber registers a card for the Pro plan; the service records the billing key Toss issued.
-- Returns service_complete_registration's result plus the customerKey and the key's sha256.
create or replace function tests.register(sub text, billing_key text) returns jsonb language plpgsql as $$
declare
  reg jsonb;
  done jsonb;
  sha text := pg_catalog.encode(extensions.digest(billing_key, 'sha256'), 'hex');
begin
  perform tests.as_user(sub);
  reg := api.begin_registration('pro');
  perform tests.as_service();
  done := billing.service_complete_registration(
            reg ->> 'customerKey', pg_catalog.convert_to('ct:' || billing_key, 'UTF8'), 'k1', sha,
            '{"card": {"number": "4330****1234", "issuerCode": "61", "cardType": "신용", "ownerType": "개인"}}');
  perform tests.as_owner();
  return done || pg_catalog.jsonb_build_object('customerKey', reg ->> 'customerKey', 'sha', sha);
end $$;

-- The service claims every due attempt and answers each with the given outcome: 'ok' (approved),
-- 'claim' (claimed, no answer yet) or a failure classification (recorded with code).
create or replace function tests.serve(outcome text default 'ok', code text default 'REJECT_CARD_PAYMENT')
returns jsonb language plpgsql as $$
declare
  c record;
  out jsonb := '[]';
begin
  perform tests.as_service();
  for c in select * from billing.service_claim_attempts('tap', 100) loop
    if outcome = 'ok' then
      perform billing.service_record_charge_success(c.attempt_id, tests.payment(c.order_id, c.amount));
    elsif outcome = 'claim' then
      null;
    else
      perform billing.service_record_charge_failure(c.attempt_id, code, 'refused', outcome);
    end if;
    out := out || pg_catalog.jsonb_build_array(c.attempt_id);
  end loop;
  perform tests.as_owner();
  return out;
end $$;

-- Test-only, so every role a test switches to may call them (the helpers switch roles mid-call).
revoke all on schema tests from public;
revoke execute on all functions in schema tests from public;
grant usage on schema tests to authenticated, anon, billing_service, service_role;
grant execute on all functions in schema tests to authenticated, anon, billing_service, service_role;

select set_eq(
  $$ select p.proname::text, r.rolname::text
       from pg_catalog.pg_proc p
      cross join (values ('authenticated'), ('anon'), ('billing_service'), ('service_role')) r(rolname)
      where p.pronamespace = 'tests'::regnamespace
        and pg_catalog.has_schema_privilege(r.rolname, 'tests', 'usage')
        and pg_catalog.has_function_privilege(r.rolname, p.oid, 'execute') $$,
  $$ select f, r
       from unnest(array['as_user', 'as_service', 'as_owner', 'svc', 'payment', 'register', 'serve']) f
      cross join unnest(array['authenticated', 'anon', 'billing_service', 'service_role']) r $$,
  'schema tests holds exactly the shared helpers, and every role the tests switch to may call them');

select * from finish();
