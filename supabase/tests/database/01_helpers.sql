-- Helpers shared by the pgTAP files, in schema tests: identity switches, running SQL as the
-- service, and Toss-shaped fixtures. Like basejump's supabase_test_helpers, this file is not rolled
-- back: `supabase test db` runs every file in name order in one database, so what it creates is
-- there for the files after it (tests/test_pgtap.py runs it before each file). Idempotent, so a
-- second run changes nothing. Test-only: no migration creates or uses schema tests.
select plan(2);

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

-- Runs one call of a service_record_* function (format() with args) as billing_service and returns
-- its billing.recorded, so a test reads (tests.rec(...)).status / .changed / .detail. The call sits
-- behind OFFSET 0 so that expanding the composite runs it once.
create or replace function tests.rec(sql text, variadic args text[] default '{}') returns billing.recorded
language plpgsql as $$
declare
  r billing.recorded;
begin
  perform tests.as_service();
  execute pg_catalog.format('select (q.r).* from (%s offset 0) as q(r)', pg_catalog.format(sql, variadic args)) into r;
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

-- The billing-key envelope the service writes (billing.is_key_envelope): version 1, the key id,
-- a 12-byte nonce, then ciphertext and a 16-byte tag. Shaped only (nothing here can decrypt it) and
-- derived from the key, so a test can name the envelope of a key it registered.
create or replace function tests.envelope(billing_key text, key_id text default 'k1') returns bytea language sql as $$
  select '\x01'::bytea || pg_catalog.set_byte('\x00'::bytea, 0, pg_catalog.length(key_id))
         || pg_catalog.convert_to(key_id, 'UTF8')
         || pg_catalog.substr(extensions.digest('nonce:' || billing_key, 'sha256'), 1, 12)
         || pg_catalog.convert_to('ct:' || billing_key, 'UTF8')
         || pg_catalog.substr(extensions.digest('tag:' || billing_key, 'sha256'), 1, 16)
$$;

-- A subscriber registers a card for the Pro plan; the service records the billing key Toss issued,
-- as an envelope under key id k1. Returns service_complete_registration's result plus the
-- customerKey and the key's sha256.
create or replace function tests.register(sub text, billing_key text) returns jsonb language plpgsql as $$
declare
  reg jsonb;
  done jsonb;
  sha text := pg_catalog.encode(extensions.digest(billing_key, 'sha256'), 'hex');
  ct bytea := tests.envelope(billing_key);  -- before the role switches: the service cannot use extensions
begin
  perform tests.as_user(sub);
  reg := api.begin_registration('pro');
  perform tests.as_service();
  done := billing.service_complete_registration(
            reg ->> 'customerKey', ct, 'k1', sha,
            '{"card": {"number": "4330****1234", "issuerCode": "61", "cardType": "신용", "ownerType": "개인"}}');
  perform tests.as_owner();
  return done || pg_catalog.jsonb_build_object('customerKey', reg ->> 'customerKey', 'sha', sha);
end $$;

-- The service claims every due attempt and answers each, under the claim's lease token, with the
-- given outcome: 'ok' (approved), 'claim' (claimed, no answer yet) or a failure classification
-- (recorded with code). Returns the claim rows (lease tokens included).
create or replace function tests.serve(outcome text default 'ok', code text default 'REJECT_CARD_PAYMENT')
returns jsonb language plpgsql as $$
declare
  c record;
  out jsonb := '[]';
begin
  perform tests.as_service();
  for c in select * from billing.service_claim_attempts('tap', 100) loop
    if outcome = 'ok' then
      perform billing.service_record_charge_success(c.attempt_id, c.lease_token, tests.payment(c.order_id, c.amount));
    elsif outcome = 'claim' then
      null;
    else
      perform billing.service_record_charge_failure(c.attempt_id, c.lease_token, code, 'refused', outcome);
    end if;
    out := out || pg_catalog.jsonb_build_array(pg_catalog.to_jsonb(c));
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
       from unnest(array['as_user', 'as_service', 'as_owner', 'svc', 'rec', 'payment', 'envelope', 'register',
                          'serve']) f
      cross join unnest(array['authenticated', 'anon', 'billing_service', 'service_role']) r $$,
  'schema tests holds exactly the shared helpers, and every role the tests switch to may call them');

select ok(billing.is_key_envelope(tests.envelope('bk_fixture'), 'k1')
          and billing.is_key_envelope(tests.envelope('bk_fixture', 'key.2026-12'), 'key.2026-12'),
  'the fixtures'' ciphertexts are billing-key envelopes, as the payment methods require');

select * from finish();
