-- Time-ordered keys for the rows written on every renewal and charge.
--
-- A random uuid puts each new row's primary-key entry on a random leaf of an index that grows by N
-- rows a month: at a million subscriptions every insert reads a page outside the buffer cache and,
-- after each checkpoint, writes a whole page image to the WAL. A key whose leading bits are the
-- creation time (the UUIDv7 layout: 48 bits of Unix milliseconds, version 7, 74 random bits) is
-- appended to the right edge instead, where the pages are hot, and stays unguessable and unique.
-- Rows that already exist keep their keys; nothing compares keys across tables. Subscriber- and
-- customer-facing keys (customers, subscriptions, registrations, cards) stay fully random: they
-- are written once per subscriber, not per month, and need not reveal when they were made.

create function billing.uuid_v7()
returns uuid
language sql
volatile
parallel safe
-- Written with qualified names and no SET clause so that it can be inlined into its callers.
as $$
  select pg_catalog.encode(
           pg_catalog.set_bit(pg_catalog.set_bit(
             pg_catalog.overlay(pg_catalog.uuid_send(pg_catalog.gen_random_uuid()),
                                pg_catalog.substr(pg_catalog.int8send(pg_catalog.floor(
                                  pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()) * 1000)::bigint), 3),
                                1, 6),
             52, 1), 53, 1),
           'hex')::uuid
$$;
revoke execute on function billing.uuid_v7() from public;
comment on function billing.uuid_v7() is
  'A new UUID in the version 7 layout: the first 48 bits are the Unix time in milliseconds (so keys '
  'made later sort later and are appended to their indexes), the rest random. Owner only (column '
  'defaults). Raises nothing.';

alter table billing.billing_periods alter column id set default billing.uuid_v7();
alter table billing.charge_attempts alter column id set default billing.uuid_v7();
alter table billing.charge_attempts alter column idempotency_key set default billing.uuid_v7();
alter table billing.payments alter column id set default billing.uuid_v7();
alter table billing.refunds alter column id set default billing.uuid_v7();
alter table billing.credit_grants alter column id set default billing.uuid_v7();
alter table billing.webhook_events alter column id set default billing.uuid_v7();
alter table billing.key_deletions alter column id set default billing.uuid_v7();
alter table billing.reconciliation_runs alter column id set default billing.uuid_v7();

-- Toss's orderId is unique per merchant and indexed here: the same layout, 12 hex digits of
-- milliseconds then 20 random ones (80 bits), keeping the documented 36 characters.
create or replace function billing.new_order_id()
returns text
language sql
volatile
set search_path = ''
as $$
  select 'ord_' || pg_catalog.lpad(pg_catalog.to_hex(pg_catalog.floor(
                     pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()) * 1000)::bigint), 12, '0')
         || pg_catalog.encode(extensions.gen_random_bytes(10), 'hex')
$$;
revoke execute on function billing.new_order_id() from public;
comment on function billing.new_order_id() is
  'A fresh Toss orderId (36 characters of ^[A-Za-z0-9_-]): ord_, 12 hex digits of Unix milliseconds '
  '(so later orders sort later and are appended to the order index), then 80 random bits. Owner '
  'only. Raises nothing.';

select billing.assert_surface_locked_down();
