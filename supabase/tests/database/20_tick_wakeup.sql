-- The tick's signals: every table billing.tick_probe reads leaves one on an insert and on an update
-- of a column the probe reads, on nothing else, and only when none is there (read committed).
begin;
select plan(6);

select set_eq(
  $$ select c.relname::text from pg_trigger t join pg_class c on c.oid = t.tgrelid
      where t.tgfoid = 'billing.signal_tick'::regproc $$,
  $$ select distinct m[1] from regexp_matches(
       (select prosrc from pg_proc where oid = 'billing.tick_probe(timestamptz)'::regprocedure),
       'from billing\.(\w+)', 'g') m $$,
  'every table the probe reads signals, and no other');

-- Which statements signal, from a state without signals: an insert and an update of each column of
-- each probed table (statement triggers fire on statements that touch no row).
create function pg_temp.signals(rel text, statement text) returns boolean language plpgsql as $$
begin
  delete from billing.tick_signals;
  execute pg_catalog.format(statement, rel, rel);
  return exists (select 1 from billing.tick_signals);
end $$;

select is_empty(
  $$ select t from unnest(array['card_registrations', 'charge_attempts', 'refunds', 'webhook_events',
                                'key_deletions', 'subscriptions', 'credit_grants', 'notifications']) t
      where not pg_temp.signals(t, 'insert into billing.%I (id) overriding system value select id from billing.%I where false') $$,
  'an insert into any probed table signals');

select set_eq(
  $$ select c.relname::text, a.attname::text
       from pg_class c join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
                           and a.attgenerated = '' and a.attidentity <> 'a'
      where c.relnamespace = 'billing'::regnamespace
        and exists (select 1 from pg_trigger t where t.tgrelid = c.oid and t.tgfoid = 'billing.signal_tick'::regproc)
        and pg_temp.signals(c.relname, pg_catalog.format('update billing.%%I set %I = %I where false', a.attname, a.attname)) $$,
  $$ values ('card_registrations', 'status'), ('card_registrations', 'expires_at'),
            ('charge_attempts', 'status'), ('charge_attempts', 'lease_expires_at'), ('charge_attempts', 'not_before'),
            ('refunds', 'status'), ('refunds', 'lease_expires_at'), ('refunds', 'not_before'),
            ('webhook_events', 'status'), ('webhook_events', 'lease_expires_at'), ('webhook_events', 'not_before'),
            ('key_deletions', 'status'), ('key_deletions', 'lease_expires_at'), ('key_deletions', 'not_before'),
            ('subscriptions', 'status'), ('subscriptions', 'current_period_ends_at'), ('subscriptions', 'grace_ends_at'),
            ('credit_grants', 'status'), ('credit_grants', 'expires_at'),
            ('notifications', 'delivered_at'), ('notifications', 'lease_expires_at') $$,
  'an update signals exactly when it sets a column the probe reads');

delete from billing.tick_signals;
update billing.subscriptions set status = status where false;
update billing.charge_attempts set not_before = not_before where false;
select is((select count(*) from billing.tick_signals), 1::bigint,
  'under read committed a signal there stands for later writes too');

-- The horizon: an empty database has nothing due, ever; a full tick stores that.
select is((select next_at from billing.tick_probe(now())), 'infinity'::timestamptz,
  'with nothing waiting the horizon is infinity');
-- (-infinity when a transaction elsewhere in the cluster held an id at that instant: a writer may
-- have skipped its signal. The tests in tests/db/test_run_ticks.py retry for the sleeping tick.)
select ok(billing.tick_settle(billing.tick_wake()) in ('infinity', '-infinity'),
  'a full tick stores that horizon');

select * from finish();
rollback;
