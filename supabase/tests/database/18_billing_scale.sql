-- Billing at scale: billing.tick() in named steps, each callable alone, run in batches under a
-- time budget; and the event log partitioned by month: append-only on every partition, the default
-- partition for instants without a month of their own, partitions kept ahead of the real clock, and
-- the archive path (detach a past month, export, drop).
begin;
select plan(52);

select billing.enable_test_clock() is not null as _ \gset
select billing.set_test_clock('2028-01-10 10:00+09') is not null as _ \gset

-- The steps, alone --------------------------------------------------------------------------------
select count(tests.register('scale-' || g, 'bk_scale_' || g)) as _ from generate_series(1, 3) g \gset
select tests.serve('ok') is not null as _ \gset
select billing.set_test_clock('2028-02-10 10:01+09') is not null as _ \gset

select is(billing.tick_renew(2), '{"rows": 2, "renewals": 2, "cardsNeeded": 0}'::jsonb,
  'tick_renew renews at most one batch');
select is((select count(*)::int from billing.charge_attempts where status = 'queued'), 2,
  'each renewal queues its charge');
select is(billing.run_tick_step('billing.tick_renew', 1, clock_timestamp() + interval '1 hour') - 'ms',
  '{"rows": 1, "renewals": 1, "cardsNeeded": 0, "batches": 2}'::jsonb,
  'run_tick_step repeats full batches and stops at the first short one');
select is(billing.tick_renew(10) -> 'rows', '0'::jsonb, 'nothing is renewed twice');
select is((select count(*)::int from billing.billing_periods where period_index = 2), 3, 'three second periods');

-- The deadline: one batch runs even when it has passed, and no more.
select billing.set_test_clock('2028-03-10 10:01+09') is not null as _ \gset
select tests.serve('ok') is not null as _ \gset
select is(billing.run_tick_step('billing.tick_renew', 1, clock_timestamp() - interval '1 second') - 'ms',
  '{"rows": 1, "renewals": 1, "cardsNeeded": 0, "batches": 1}'::jsonb,
  'past its deadline a step still runs one batch, and only one');
select ok((billing.run_tick_step('billing.tick_renew', 1, clock_timestamp()) ->> 'ms')::numeric >= 0,
  'each step reports how long it took');

-- Registrations, credits and leases, each alone.
select tests.as_user('scale-late') as _ \gset
select api.begin_registration('pro') is not null as _ \gset
select tests.as_owner() as _ \gset
select billing.advance_test_clock('2 hours') is not null as _ \gset
select is(billing.tick_expire_registrations(10), '{"rows": 1, "registrationsExpired": 1}'::jsonb,
  'tick_expire_registrations expires an abandoned registration');
select count(*)::int as ended_grants from billing.credit_grants
 where status = 'active' and expires_at <= billing.now() \gset
select is((billing.tick_expire_credits(100) ->> 'creditGrantsExpired')::int, :ended_grants,
  'tick_expire_credits expires the grants of the periods that ended');
select ok(:ended_grants > 0 and not exists (select 1 from billing.credit_grants
                                             where status = 'active' and expires_at <= billing.now()),
  'all of them');
select is(billing.tick_expire_leases(10) - 'rows',
  '{"attempts": 0, "refunds": 0, "webhooks": 0, "keyDeletions": 0}'::jsonb, 'tick_expire_leases: no leases out');
select is(billing.tick_end_grace(10), '{"rows": 0, "endedAfterGrace": 0}'::jsonb, 'tick_end_grace: nobody in grace');
select is(billing.tick_end_at_period_end(10), '{"rows": 0, "endedAtPeriodEnd": 0}'::jsonb,
  'tick_end_at_period_end: nobody cancelled');

-- The tick: every step in order, with what each did.
select billing.tick() as t \gset
select set_eq(format($$ select jsonb_object_keys(%L::jsonb -> 'steps') $$, :'t'),
  array['expireRegistrations', 'expireLeases', 'endAtPeriodEnd', 'renew', 'endGrace', 'expireCredits',
        'maintainEventPartitions'],
  'the tick reports each of its steps');
select ok((select bool_and(v ? 'ms' and v ? 'batches' and v ? 'rows') from jsonb_each(:'t'::jsonb -> 'steps') s(k, v)),
  'each step says how many rows, batches and milliseconds');
select is((:'t'::jsonb ->> 'renewals')::int, (:'t'::jsonb #>> '{steps,renew,renewals}')::int,
  'the summary keys are the steps'' counts');

-- The event log's partitions -----------------------------------------------------------------------
select is((select relkind::text from pg_class where oid = 'billing.events'::regclass), 'p',
  'billing.events is partitioned');
select is_empty($$ select c.oid::regclass from pg_inherits i join pg_class c on c.oid = i.inhrelid
                    where i.inhparent = 'billing.events'::regclass
                      and c.relnamespace <> 'billing_history'::regnamespace $$,
  'its partitions live in billing_history');
select is_empty($$ select c.oid::regclass from pg_inherits i join pg_class c on c.oid = i.inhrelid
                    where i.inhparent = 'billing.events'::regclass
                      and not exists (select 1 from pg_trigger t where t.tgrelid = c.oid and t.tgname = 'events_no_truncate')
                   union all
                   select c.oid::regclass from pg_inherits i join pg_class c on c.oid = i.inhrelid
                    where i.inhparent = 'billing.events'::regclass
                      and not exists (select 1 from pg_trigger t where t.tgrelid = c.oid and t.tgname = 'events_append_only') $$,
  'every partition refuses UPDATE, DELETE and TRUNCATE');
select is_empty($$ select r.rolname, c.oid::regclass
                     from pg_inherits i join pg_class c on c.oid = i.inhrelid
                    cross join (values ('anon'), ('authenticated'), ('service_role'), ('billing_service')) r(rolname)
                    where i.inhparent = 'billing.events'::regclass
                      and (not c.relrowsecurity or has_table_privilege(r.rolname, c.oid, 'select, insert, update, delete, truncate')) $$,
  'every partition has row-level security and no grants');
select ok(not has_schema_privilege('authenticated', 'billing_history', 'usage')
          and not has_schema_privilege('billing_service', 'billing_history', 'usage'),
  'billing_history is the owner''s alone');

select ok(exists (select 1 from pg_inherits
                   where inhparent = 'billing.events'::regclass
                     and inhrelid = to_regclass('billing_history.events_'
                                                || to_char(now() at time zone 'UTC' + interval '2 months', 'YYYY_MM'))),
  'partitions exist ahead of the real clock');
select is((select count(*)::int from billing.events e
            where e.tableoid = 'billing_history.events_default'::regclass and e.occurred_at >= '2028-01-01'),
          (select count(*)::int from billing.events e where e.occurred_at >= '2028-01-01'),
  'events at a test-clock instant without a month of its own land in the default partition');
select throws_ok($$ truncate billing_history.events_default $$, 'SB403', null, 'a partition cannot be truncated');
select throws_ok($$ delete from billing_history.events_default $$, 'SB403', null, 'nor its rows deleted');
select throws_ok($$ update billing_history.events_default set reason = 'x' $$, 'SB403', null, 'nor updated');

-- A month is created once; it cannot be created over rows that already sit in the default partition.
select is(billing.ensure_event_partition('2040-01-01'), true, 'a month''s partition is created and attached');
select is(billing.ensure_event_partition('2040-01-20'), false, 'and only once');
select billing.set_test_clock('2040-01-15 10:00+09') is not null as _ \gset
select billing.log_event('clock', null, 'probe') is not null as _ \gset
select is((select tableoid::regclass::text from billing.events where action = 'probe'), 'billing_history.events_2040_01',
  'rows of that month go to its partition');
select throws_ok($$ select billing.ensure_event_partition('2028-02-01') $$, '23514', null,
  'a month whose rows sit in the default partition stays there');

-- The tick keeps the months ahead: a missing one is created, one blocked by rows is reported.
select to_char(now() at time zone 'UTC' + interval '2 months', 'YYYY_MM') as m2,
       date_trunc('month', now() at time zone 'UTC' + interval '2 months') + interval '14 days' as m2_mid \gset
select lives_ok(format($$ alter table billing.events detach partition billing_history.events_%s;
                          drop table billing_history.events_%s $$, :'m2', :'m2'), 'drop an empty month ahead');
select is(billing.tick_maintain_event_partitions(1) - 'rows', '{"partitionsCreated": 1, "partitionsBlocked": 0}'::jsonb,
  'the tick creates a missing month ahead');
select lives_ok(format($$ alter table billing.events detach partition billing_history.events_%s;
                          drop table billing_history.events_%s $$, :'m2', :'m2'), 'drop it again');
select billing.set_test_clock(:'m2_mid'::timestamp at time zone 'UTC') is not null as _ \gset
select billing.log_event('clock', null, 'early') is not null as _ \gset
select is(billing.tick_maintain_event_partitions(1) - 'rows', '{"partitionsCreated": 0, "partitionsBlocked": 1}'::jsonb,
  'rows already written for that month block it, and the tick says so');
select is((select tableoid::regclass::text from billing.events where action = 'early'), 'billing_history.events_default',
  'those rows stay in the default partition');

-- Archiving: detach a past month, still append-only, then export and drop it.
select is(billing.ensure_event_partition('2020-01-01'), true, 'a past month');
select billing.set_test_clock('2020-01-15 10:00+09') is not null as _ \gset
select billing.log_event('clock', null, 'old') is not null as _ \gset
select throws_ok($$ select billing.archive_event_month(date_trunc('month', now())::date) $$, 'SB400', null,
  'the current month cannot be archived');
select is(billing.archive_event_month('2020-01-01'), 'billing_history.events_2020_01', 'a past month is detached');
select is_empty($$ select 1 from billing.events where action = 'old' $$, 'its rows leave the live log');
select is((select count(*)::int from billing_history.events_2020_01 where action = 'old'), 1, 'and wait in the detached table');
select throws_ok($$ delete from billing_history.events_2020_01 $$, 'SB403', null, 'which stays append-only');
select throws_ok($$ truncate billing_history.events_2020_01 $$, 'SB403', null, 'and cannot be truncated');
select throws_ok($$ select billing.archive_event_month('2020-01-01') $$, 'SB404', null, 'a month is archived once');
select ok(exists (select 1 from billing.events where action = 'month_archived' and reason = 'events_2020_01'),
  'archiving is logged');
select lives_ok($$ drop table billing_history.events_2020_01 $$, 'after export the owner drops it');


-- Helpers planned once per session ---------------------------------------------------------------
select is((select pg_catalog.array_agg(p.proname::text order by p.proname)
             from pg_proc p join pg_language l on l.oid = p.prolang
            where p.pronamespace = 'billing'::regnamespace and l.lanname = 'sql' and p.proconfig is not null
              and p.proname in ('now', 'actor_role', 'jwt_sub', 'period_start', 'add_local', 'backoff', 'order_name',
                                'payment_cancels', 'cancel_count', 'recorded_of', 'attempt_recorded',
                                'new_order_id', 'webhook_headers')),
  null,
  'the helpers called on every charge, renewal and event are not SQL functions with a SET clause (planned per call)');

select is((select pg_catalog.array_agg(c.relname::text order by c.relname) from pg_catalog.pg_class c
            where c.relnamespace = 'billing'::regnamespace
              and c.reloptions @> array['autovacuum_vacuum_scale_factor=0.01', 'autovacuum_analyze_scale_factor=0.02']),
  array['billing_periods', 'card_registrations', 'charge_attempts', 'credit_grants', 'notifications', 'subscriptions'],
  'the tables a burst rewrites are vacuumed after 1 % of them is dead, not 20 %');

-- "create or replace" resets a function's settings: every function keeps JIT off.
select is_empty($$
  select p.oid::regprocedure::text from pg_proc p join pg_namespace n on n.oid = p.pronamespace
   where n.nspname in ('billing', 'api', 'api_impl') and p.prokind = 'f'
     and not 'jit=off' = any (coalesce(p.proconfig, '{}'))$$,
  'every billing, api and api_impl function runs without JIT compilation');

-- Row ids: version 8 UUIDs of an insertion point (1 of 16) and the creation time.
select is((select count(*)::int from (select billing.new_id()::text as id from generate_series(1, 2000)) x
            where x.id ~ '^[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$'),
  2000, 'row ids are RFC 9562 version 8 UUIDs');
select is((select array[count(distinct pg_catalog.left(x.id::text, 1)), count(distinct x.id)]::int[]
             from (select billing.new_id() as id from generate_series(1, 2000)) x),
  array[16, 2000], 'row ids are distinct and spread over sixteen insertion points');
select is(substr(replace(billing.new_id('2028-01-10 10:00:00.123+09')::text, '-', ''), 2, 11),
  lpad(to_hex((extract(epoch from timestamptz '2028-01-10 10:00:00.123+09') * 1000)::bigint), 11, '0'),
  'a row id carries its creation time in milliseconds after its insertion point');
select is_empty($$
  select a.attrelid::regclass::text || '.' || a.attname from pg_attrdef d
    join pg_attribute a on a.attrelid = d.adrelid and a.attnum = d.adnum
    join pg_class t on t.oid = d.adrelid join pg_namespace n on n.oid = t.relnamespace
   where n.nspname = 'billing' and a.atttypid = 'uuid'::regtype
     and pg_get_expr(d.adbin, d.adrelid) <> 'billing.new_id()'$$,
  'every uuid column default in billing is billing.new_id()');

select * from finish();
rollback;
