-- Operator tools (saju-billing ops …): the state of billing at a glance, a subscription's history
-- from the audit log, and the alerts raised. Owner (postgres) only, like every operator function;
-- refunds, cancels, retries and reconciliation already have theirs (20261121200300, 20261203100000).
-- SQLSTATEs: see 20261121200100_billing_core.sql.

create function billing.ops_status()
returns jsonb
language sql
stable
set search_path = ''
as $$
  select pg_catalog.jsonb_build_object(
    'at', billing.now(),
    'subscriptions', (select pg_catalog.jsonb_object_agg(x.status, x.n)
                        from (select s.status::text as status, pg_catalog.count(*) as n
                                from billing.subscriptions s group by s.status) x),
    -- Renewals the tick has yet to turn into attempts (due now).
    'renewalsDue', (select pg_catalog.count(*) from billing.subscriptions s
                     where s.status = 'active' and s.current_period_ends_at <= billing.now()),
    'attemptsQueued', (select pg_catalog.count(*) from billing.charge_attempts where status = 'queued'),
    'attemptsInFlight', (select pg_catalog.count(*) from billing.charge_attempts where status = 'claimed'),
    'attemptsUnknown', (select pg_catalog.count(*) from billing.charge_attempts where status = 'unknown'),
    'awaitingCard', (select pg_catalog.count(*) from billing.subscriptions s
                      where s.awaiting_card and s.status in ('incomplete', 'active', 'past_due')),
    'refundsPending', (select pg_catalog.count(*) from billing.refunds where status in ('requested', 'claimed')),
    'refundsFailed', (select pg_catalog.count(*) from billing.refunds where status = 'failed'),
    'alertsLast7Days', (select pg_catalog.count(*) from billing.notifications n
                         where n.kind = 'alert' and n.created_at > billing.now() - interval '7 days'))
$$;
revoke execute on function billing.ops_status() from public;
comment on function billing.ops_status() is
  'Operator: subscriptions by status, renewals due, attempts queued / in flight / unknown, '
  'subscriptions awaiting a card, refunds pending or failed, alerts of the last 7 days. Owner '
  '(postgres) only. Raises nothing.';

create function billing.ops_history(subscriber text)
returns table (occurred_at timestamptz, entity_type text, entity_id uuid, action text, old_status text,
               new_status text, reason text, actor_role text)
language plpgsql
stable
set search_path = ''
as $$
declare
  v_customer uuid;
begin
  -- A subscription id, a customer id, or the subscriber's user id (the JWT sub).
  if subscriber is null or pg_catalog.length(subscriber) not between 1 and 255 then
    raise exception 'give a subscription id, a customer id or a user id' using errcode = 'SB400';
  end if;
  select c.id into v_customer from billing.customers c where c.user_id = subscriber;
  if v_customer is null and subscriber ~ '^[0-9a-fA-F-]{36}$' then
    select coalesce((select s.customer_id from billing.subscriptions s where s.id = subscriber::uuid),
                    (select c.id from billing.customers c where c.id = subscriber::uuid))
      into v_customer;
  end if;
  if v_customer is null then
    raise exception 'no subscriber %', subscriber using errcode = 'SB404';
  end if;
  return query
  with entities as (
    select v_customer as id
    union all select r.id from billing.card_registrations r where r.customer_id = v_customer
    union all select pm.id from billing.payment_methods pm where pm.customer_id = v_customer
    union all select s.id from billing.subscriptions s where s.customer_id = v_customer
    union all select bp.id from billing.billing_periods bp
               join billing.subscriptions s on s.id = bp.subscription_id where s.customer_id = v_customer
    union all select ca.id from billing.charge_attempts ca
               join billing.subscriptions s on s.id = ca.subscription_id where s.customer_id = v_customer
    union all select p.id from billing.payments p where p.customer_id = v_customer
    union all select rf.id from billing.refunds rf
               join billing.payments p on p.id = rf.payment_id where p.customer_id = v_customer
    union all select g.id from billing.credit_grants g where g.customer_id = v_customer
  )
  select e.occurred_at, e.entity_type, e.entity_id, e.action, e.old_status, e.new_status, e.reason, e.actor_role
    from entities x
    join billing.events e on e.entity_id = x.id
   order by e.id;
end
$$;
revoke execute on function billing.ops_history(text) from public;
comment on function billing.ops_history(text) is
  'Operator: every audited change of a subscriber (by user id, customer id or subscription id) and '
  'of their registrations, cards, subscriptions, periods, attempts, payments, refunds and credit '
  'grants, oldest first. Owner (postgres) only. Raises SB400 (empty), SB404 (unknown subscriber).';

create function billing.ops_alerts(since timestamptz default null, max_rows integer default 100)
returns table (alert_id bigint, created_at timestamptz, topic text, entity_type text, entity_id text,
               details jsonb, delivered boolean)
language sql
stable
set search_path = ''
as $$
  select n.id, n.created_at, n.payload ->> 'topic', n.payload ->> 'entityType', n.payload ->> 'entityId',
         n.payload -> 'details', n.delivered_at is not null
    from billing.notifications n
   where n.kind = 'alert'
     and n.created_at >= coalesce(since, billing.now() - interval '7 days')
   order by n.id desc
   limit greatest(least(coalesce(max_rows, 100), 1000), 1)
$$;
revoke execute on function billing.ops_alerts(timestamptz, integer) from public;
comment on function billing.ops_alerts(timestamptz, integer) is
  'Operator: the alerts raised since an instant (default: the last 7 days), newest first, at most '
  'max_rows (1–1000). Owner (postgres) only. Raises nothing.';

select billing.assert_surface_locked_down();
