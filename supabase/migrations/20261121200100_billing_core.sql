-- Billing core: the clock, calendar periods and the internal state transitions that the service,
-- operator, subscriber and scheduler functions (later migrations) are built from.
--
-- Errors. Every function raises only these SQLSTATEs of its own (class SB); the service maps them
-- (and constraint names) to its exceptions, never message text. Messages carry the ids involved.
--
--   SB400  invalid input: a missing, malformed or out-of-range argument; nothing was changed
--   SB401  not signed in: no JWT "sub" in request.jwt.claims
--   SB403  forbidden: the operation is not allowed here (test clock disabled, append-only data)
--   SB404  not found: the row named by the arguments does not exist (or is not the caller's)
--   SB409  conflict: the row is not in a state that allows this transition, or a different
--          result was already recorded
--   SB422  business rule: valid input that the rules refuse (no credits left, refund larger
--          than what is refundable, too many pending registrations, ...)
--
-- A transition is one guarded statement: update … where id = … and status in (…) returning …;
-- when nothing matched it raises SB409 (or SB404) naming the ids.
--
-- Lock order, to keep concurrent callers from deadlocking: subscription, then period, then
-- attempt; a payment before its refunds; a customer before its credit grants.
--
-- Every function here is internal: owner only (no grants), security invoker, called from the
-- security-definer entry points of the later migrations.

-- ---------------------------------------------------------------------------------------------
-- Calendar
-- ---------------------------------------------------------------------------------------------

-- Start of period n+1 (n = 0 is the anchor itself): the anchor's local Asia/Seoul date-time plus
-- n calendar months. Counting from the anchor (never from the previous period) clamps to the
-- month's last day and returns to the anchor day: Jan 31 → Feb 28/29 → Mar 31 → Apr 30.
create function billing.period_start(anchor timestamptz, n integer)
returns timestamptz
language sql
immutable
strict
parallel safe
set search_path = ''
as $$
  select pg_catalog.timezone('Asia/Seoul',
           pg_catalog.timezone('Asia/Seoul', anchor) + pg_catalog.make_interval(months => n))
$$;
revoke execute on function billing.period_start(timestamptz, integer) from public;
comment on function billing.period_start(timestamptz, integer) is
  'Start of the billing period after n whole calendar months from anchor, in Asia/Seoul, clamped '
  'to month end (period k covers [period_start(anchor, k-1), period_start(anchor, k))). '
  'Owner only. Raises nothing.';

-- Adds a calendar step (days, months) in Seoul local time.
create function billing.add_local(at timestamptz, step interval)
returns timestamptz
language sql
immutable
strict
parallel safe
set search_path = ''
as $$
  select pg_catalog.timezone('Asia/Seoul', pg_catalog.timezone('Asia/Seoul', at) + step)
$$;
revoke execute on function billing.add_local(timestamptz, interval) from public;
comment on function billing.add_local(timestamptz, interval) is
  'at + step computed on the Asia/Seoul calendar. Owner only. Raises nothing.';

create function billing.backoff(n integer, base interval, cap interval)
returns interval
language sql
immutable
strict
parallel safe
set search_path = ''
as $$
  select least(cap, base * pg_catalog.power(2, least(greatest(n - 1, 0), 20))::double precision)
$$;
revoke execute on function billing.backoff(integer, interval, interval) from public;
comment on function billing.backoff(integer, interval, interval) is
  'Exponential backoff: base * 2^(n-1), at most cap. Owner only. Raises nothing.';

-- ---------------------------------------------------------------------------------------------
-- Test clock
-- ---------------------------------------------------------------------------------------------
create function billing.enable_test_clock()
returns timestamptz
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_now timestamptz;
begin
  -- A database that has taken real money is not a test database.
  if exists (select 1 from billing.payments) then
    raise exception 'refusing to enable the test clock: this database already holds payments'
      using errcode = 'SB403';
  end if;
  update billing.clock
     set enabled = true, frozen_at = coalesce(frozen_at, pg_catalog.now()), changed_at = pg_catalog.now()
   where singleton
  returning frozen_at into v_now;
  perform billing.log_event('clock', null, 'test_clock_enabled', null,
                            pg_catalog.jsonb_build_object('at', v_now));
  return v_now;
end
$$;
revoke execute on function billing.enable_test_clock() from public;

create function billing.require_test_clock()
returns void
language plpgsql
stable
set search_path = ''
as $$
begin
  if not (select c.enabled from billing.clock c where c.singleton) then
    raise exception 'the test clock is not enabled in this database (billing.enable_test_clock())'
      using errcode = 'SB403';
  end if;
end
$$;
revoke execute on function billing.require_test_clock() from public;
comment on function billing.require_test_clock() is
  'Raises SB403 unless the test clock is enabled. Owner only.';

-- Freezes the test clock at an instant and logs the move (from, to) as the given action. Callers
-- check that the clock is enabled and that the instant is valid.
create function billing.move_test_clock(at timestamptz, action text)
returns timestamptz
language plpgsql
set search_path = ''
as $$
declare
  v_old timestamptz := billing.now();
begin
  update billing.clock set frozen_at = at, clock_offset = interval '0', changed_at = pg_catalog.now()
   where singleton;
  perform billing.log_event('clock', null, action, null, pg_catalog.jsonb_build_object('from', v_old, 'to', at));
  return at;
end
$$;
revoke execute on function billing.move_test_clock(timestamptz, text) from public;
comment on function billing.move_test_clock(timestamptz, text) is
  'Freezes the test clock at an instant and logs the move as the given action; returns the instant. '
  'Owner only (used by set_test_clock and advance_test_clock). Raises nothing of its own.';

create function billing.set_test_clock(at timestamptz)
returns timestamptz
language plpgsql
security definer
set search_path = ''
as $$
begin
  perform billing.require_test_clock();
  if at is null or not pg_catalog.isfinite(at) then
    raise exception 'set_test_clock: a finite timestamp is required' using errcode = 'SB400';
  end if;
  return billing.move_test_clock(at, 'test_clock_set');
end
$$;
revoke execute on function billing.set_test_clock(timestamptz) from public;

create function billing.advance_test_clock(by interval)
returns timestamptz
language plpgsql
security definer
set search_path = ''
as $$
begin
  perform billing.require_test_clock();
  if by is null or by < interval '0' then
    raise exception 'advance_test_clock: a non-negative interval is required, got %', by
      using errcode = 'SB400';
  end if;
  return billing.move_test_clock(billing.now() + by, 'test_clock_advanced');
end
$$;
revoke execute on function billing.advance_test_clock(interval) from public;

-- ---------------------------------------------------------------------------------------------
-- Log, notifications, alerts
-- ---------------------------------------------------------------------------------------------
create function billing.log_event(entity_type text, entity_id uuid, action text, reason text default null,
                                  details jsonb default null)
returns void
language sql
set search_path = ''
as $$
  insert into billing.events (actor_role, actor_sub, entity_type, entity_id, action, reason, details)
  values (billing.actor_role(), billing.jwt_sub(), entity_type, entity_id, action, reason, details)
$$;
revoke execute on function billing.log_event(text, uuid, text, text, jsonb) from public;
comment on function billing.log_event(text, uuid, text, text, jsonb) is
  'Appends an event that is not a status change (status changes are logged by triggers). Owner only. Raises nothing.';

comment on function billing.enable_test_clock() is
  'Enables the per-database test clock, frozen at the current time. Owner (postgres) only; never '
  'called in production. Raises SB403 when the database already holds payments.';
comment on function billing.set_test_clock(timestamptz) is
  'Freezes the test clock at the given instant (may move backwards). Owner (postgres) only. '
  'Raises SB403 unless billing.enable_test_clock() was called, SB400 for null/infinite input.';
comment on function billing.advance_test_clock(interval) is
  'Moves the frozen test clock forward by the interval; returns the new time. Owner (postgres) '
  'only. Raises SB403 unless the test clock is enabled, SB400 for a null or negative interval.';

create function billing.notify_subscriber(kind billing.notification_kind, subscription_id uuid, payload jsonb)
returns bigint
language sql
set search_path = ''
as $$
  insert into billing.notifications (kind, customer_id, user_id, subscription_id, payload)
  select notify_subscriber.kind, s.customer_id, s.user_id, s.id,
         coalesce(notify_subscriber.payload, '{}'::jsonb) || pg_catalog.jsonb_build_object('subscriptionId', s.id)
    from billing.subscriptions s
   where s.id = notify_subscriber.subscription_id
  returning id
$$;
revoke execute on function billing.notify_subscriber(billing.notification_kind, uuid, jsonb) from public;
comment on function billing.notify_subscriber(billing.notification_kind, uuid, jsonb) is
  'Queues a notification for the subscriber of a subscription in the outbox. Owner only. Raises nothing.';

create function billing.raise_alert(topic text, entity_type text, entity_id uuid, details jsonb)
returns bigint
language plpgsql
set search_path = ''
as $$
declare
  v_id bigint;
begin
  insert into billing.notifications (kind, payload)
  values ('alert', pg_catalog.jsonb_build_object('topic', topic, 'entityType', entity_type,
                                                 'entityId', entity_id, 'details', details))
  returning id into v_id;
  perform billing.log_event(entity_type, entity_id, 'alert', topic, details);
  return v_id;
end
$$;
revoke execute on function billing.raise_alert(text, text, uuid, jsonb) from public;
comment on function billing.raise_alert(text, text, uuid, jsonb) is
  'Queues an operator alert in the outbox and logs it. Owner only. Raises nothing.';

-- ---------------------------------------------------------------------------------------------
-- Prices, order ids, input parsing
-- ---------------------------------------------------------------------------------------------
create function billing.price_at(plan_id uuid, at timestamptz)
returns billing.plan_prices
language plpgsql
stable
set search_path = ''
as $$
declare
  v billing.plan_prices;
begin
  select pp.* into v
    from billing.plan_prices pp
   where pp.plan_id = price_at.plan_id and pp.effective_from <= at
   order by pp.effective_from desc
   limit 1;
  if not found then
    raise exception 'plan % has no price in effect at %', plan_id, at using errcode = 'SB422';
  end if;
  return v;
end
$$;
revoke execute on function billing.price_at(uuid, timestamptz) from public;
comment on function billing.price_at(uuid, timestamptz) is
  'The price version of a plan in effect at an instant. Owner only. Raises SB422 when none is.';

create function billing.new_order_id()
returns text
language sql
volatile
set search_path = ''
as $$
  select 'ord_' || pg_catalog.encode(extensions.gen_random_bytes(16), 'hex')
$$;
revoke execute on function billing.new_order_id() from public;
comment on function billing.new_order_id() is
  'A fresh Toss orderId (36 characters of ^[A-Za-z0-9_-]). Owner only. Raises nothing.';

create function billing.order_name(plan_name text, starts_at timestamptz, ends_at timestamptz)
returns text
language sql
stable
set search_path = ''
as $$
  select pg_catalog.left(plan_name || ' '
           || pg_catalog.to_char(pg_catalog.timezone('Asia/Seoul', starts_at), 'YYYY.MM.DD') || '~'
           || pg_catalog.to_char(pg_catalog.timezone('Asia/Seoul', ends_at) - interval '1 day', 'YYYY.MM.DD'),
         100)
$$;
revoke execute on function billing.order_name(text, timestamptz, timestamptz) from public;
comment on function billing.order_name(text, timestamptz, timestamptz) is
  'The Toss orderName of a period''s charge, at most 100 characters. Owner only. Raises nothing.';

-- Validates a Toss Payment object and returns the fields billing uses.
create function billing.parse_payment(
  payment jsonb,
  out payment_key text, out order_id text, out status text, out method text,
  out total_amount bigint, out balance_amount bigint, out approved_at timestamptz,
  out secret text, out receipt_url text, out last_transaction_key text)
language plpgsql
stable
set search_path = ''
as $$
begin
  if payment is null or pg_catalog.jsonb_typeof(payment) <> 'object' then
    raise exception 'payment must be a Toss Payment JSON object' using errcode = 'SB400';
  end if;
  payment_key := payment ->> 'paymentKey';
  order_id := payment ->> 'orderId';
  status := payment ->> 'status';
  if payment_key is null or pg_catalog.length(payment_key) not between 1 and 200 then
    raise exception 'payment.paymentKey is missing or longer than 200 characters' using errcode = 'SB400';
  end if;
  if order_id is null or pg_catalog.length(order_id) not between 1 and 64 then
    raise exception 'payment % has no valid orderId', payment_key using errcode = 'SB400';
  end if;
  if status is null or status not in ('READY', 'IN_PROGRESS', 'WAITING_FOR_DEPOSIT', 'DONE', 'CANCELED',
                                      'PARTIAL_CANCELED', 'ABORTED', 'EXPIRED') then
    raise exception 'payment % has an unknown status %', payment_key, status using errcode = 'SB400';
  end if;
  if pg_catalog.jsonb_typeof(payment -> 'totalAmount') is distinct from 'number'
     or pg_catalog.jsonb_typeof(payment -> 'balanceAmount') is distinct from 'number' then
    raise exception 'payment % needs numeric totalAmount and balanceAmount', payment_key using errcode = 'SB400';
  end if;
  begin
    if (payment ->> 'totalAmount')::numeric <> pg_catalog.trunc((payment ->> 'totalAmount')::numeric)
       or (payment ->> 'balanceAmount')::numeric <> pg_catalog.trunc((payment ->> 'balanceAmount')::numeric) then
      raise exception 'payment % has a fractional KRW amount', payment_key using errcode = 'SB400';
    end if;
    total_amount := (payment ->> 'totalAmount')::numeric::bigint;
    balance_amount := (payment ->> 'balanceAmount')::numeric::bigint;
    approved_at := (payment ->> 'approvedAt')::timestamptz;
  exception
    when numeric_value_out_of_range or invalid_datetime_format or datetime_field_overflow
         or invalid_text_representation then
      raise exception 'payment % has an invalid amount or approvedAt (%)', payment_key, sqlerrm
        using errcode = 'SB400';
  end;
  if total_amount <= 0 or balance_amount < 0 or balance_amount > total_amount then
    raise exception 'payment % has inconsistent amounts (total %, balance %)', payment_key, total_amount, balance_amount
      using errcode = 'SB400';
  end if;
  method := payment ->> 'method';
  secret := payment ->> 'secret';
  receipt_url := payment -> 'receipt' ->> 'url';
  last_transaction_key := payment ->> 'lastTransactionKey';
end
$$;
revoke execute on function billing.parse_payment(jsonb) from public;
comment on function billing.parse_payment(jsonb) is
  'Validates a Toss Payment object and extracts the fields billing keeps. Owner only. Raises SB400 on malformed input.';

-- ---------------------------------------------------------------------------------------------
-- Periods and attempts
-- ---------------------------------------------------------------------------------------------

-- Creates period `period_index` of a subscription (amount from the price in effect at its start)
-- and makes it the current period.
create function billing.open_period(subscription_id uuid, period_index integer, reason text)
returns billing.billing_periods
language plpgsql
set search_path = ''
as $$
declare
  s billing.subscriptions;
  v_price billing.plan_prices;
  p billing.billing_periods;
  v_starts timestamptz;
  v_ends timestamptz;
begin
  select * into strict s from billing.subscriptions where id = open_period.subscription_id;
  v_starts := billing.period_start(s.billing_anchor, period_index - 1);
  v_ends := billing.period_start(s.billing_anchor, period_index);
  v_price := billing.price_at(s.plan_id, v_starts);
  insert into billing.billing_periods (subscription_id, user_id, period_index, starts_at, ends_at, price_id,
                                       amount, status_reason)
  values (s.id, s.user_id, period_index, v_starts, v_ends, v_price.id, v_price.amount, reason)
  returning * into p;
  update billing.subscriptions
     set current_period_id = p.id, current_period_index = p.period_index,
         current_period_starts_at = p.starts_at, current_period_ends_at = p.ends_at
   where id = s.id;
  return p;
end
$$;
revoke execute on function billing.open_period(uuid, integer, text) from public;
comment on function billing.open_period(uuid, integer, text) is
  'Creates a subscription''s period n (calendar month from the anchor, price in effect at its start) '
  'and makes it current. Owner only. Raises SB422 when the plan has no price then; '
  'unique violation billing_periods_subscription_id_period_index_key if it exists.';

-- A new attempt (fresh orderId and Idempotency-Key) for a period, on the subscription's card.
create function billing.create_attempt(period_id uuid, not_before timestamptz, reason text)
returns billing.charge_attempts
language plpgsql
set search_path = ''
as $$
declare
  p billing.billing_periods;
  s billing.subscriptions;
  v_plan_name text;
  a billing.charge_attempts;
begin
  select * into strict p from billing.billing_periods bp where bp.id = create_attempt.period_id;
  select * into strict s from billing.subscriptions where id = p.subscription_id;
  select pl.name into strict v_plan_name from billing.plans pl where pl.id = s.plan_id;
  insert into billing.charge_attempts (period_id, subscription_id, user_id, payment_method_id, attempt_number,
                                       order_id, amount, order_name, not_before, status_reason)
  values (p.id, p.subscription_id, p.user_id, s.payment_method_id,
          coalesce((select max(ca.attempt_number) from billing.charge_attempts ca where ca.period_id = p.id), 0) + 1,
          billing.new_order_id(), p.amount, billing.order_name(v_plan_name, p.starts_at, p.ends_at),
          not_before, reason)
  returning * into a;
  return a;
end
$$;
revoke execute on function billing.create_attempt(uuid, timestamptz, text) from public;
comment on function billing.create_attempt(uuid, timestamptz, text) is
  'Queues a new charge attempt (new orderId and Idempotency-Key, amount = the period''s) due at '
  'not_before on the subscription''s current card. Owner only. Raises nothing of its own.';

-- Attempts that were never handed out are withdrawn; ones that were (a re-send is pending) must
-- be resolved by a lookup first, since the first send may have charged.
create function billing.withdraw_attempts(subscription_id uuid, reason text)
returns integer
language plpgsql
set search_path = ''
as $$
declare
  v_canceled integer;
begin
  update billing.charge_attempts ca
     set status = 'canceled', status_reason = reason, resolved_at = billing.now()
   where ca.subscription_id = withdraw_attempts.subscription_id and ca.status = 'queued' and ca.sends = 0;
  get diagnostics v_canceled = row_count;
  update billing.charge_attempts ca
     set status = 'unknown', status_reason = reason || '; sent before, look it up',
         not_before = billing.now()
   where ca.subscription_id = withdraw_attempts.subscription_id and ca.status = 'queued' and ca.sends > 0;
  return v_canceled;
end
$$;
revoke execute on function billing.withdraw_attempts(uuid, text) from public;
comment on function billing.withdraw_attempts(uuid, text) is
  'Cancels a subscription''s queued attempts that were never sent and turns re-sends into lookups. '
  'Owner only. Raises nothing.';

create function billing.schedule_key_deletion(payment_method_id uuid, reason text)
returns void
language sql
set search_path = ''
as $$
  insert into billing.key_deletions (payment_method_id, reason, status_reason)
  select pm.id, schedule_key_deletion.reason, schedule_key_deletion.reason
    from billing.payment_methods pm
   where pm.id = schedule_key_deletion.payment_method_id and pm.status <> 'deleted'
  on conflict on constraint key_deletions_payment_method_id_key do nothing
$$;
revoke execute on function billing.schedule_key_deletion(uuid, text) from public;
comment on function billing.schedule_key_deletion(uuid, text) is
  'Queues the deletion of a billing key at Toss (once per payment method). Owner only. Raises nothing.';

-- ---------------------------------------------------------------------------------------------
-- Credits
-- ---------------------------------------------------------------------------------------------
create function billing.grant_period_credits(period_id uuid, payment_id uuid)
returns uuid
language plpgsql
set search_path = ''
as $$
declare
  p billing.billing_periods;
  s billing.subscriptions;
  v_amount integer;
  v_grant uuid;
begin
  select * into strict p from billing.billing_periods bp where bp.id = grant_period_credits.period_id;
  select * into strict s from billing.subscriptions where id = p.subscription_id;
  select pl.credits_per_period into strict v_amount from billing.plans pl where pl.id = s.plan_id;
  if v_amount = 0 then
    return null;
  end if;
  insert into billing.credit_grants (customer_id, user_id, subscription_id, period_id, payment_id, amount,
                                     remaining, granted_at, expires_at, status_reason)
  values (s.customer_id, s.user_id, s.id, p.id, payment_id, v_amount, v_amount, billing.now(), p.ends_at,
          'period ' || p.period_index || ' paid')
  on conflict on constraint credit_grants_period_id_key do nothing
  returning id into v_grant;
  if v_grant is not null then
    insert into billing.credit_entries (customer_id, user_id, grant_id, kind, amount, reason)
    values (s.customer_id, s.user_id, v_grant, 'grant', v_amount, 'period ' || p.period_index || ' paid');
  end if;
  return v_grant;
end
$$;
revoke execute on function billing.grant_period_credits(uuid, uuid) from public;
comment on function billing.grant_period_credits(uuid, uuid) is
  'Grants the plan''s credits for a paid period (once), expiring at the period end. Owner only. Raises nothing.';

-- Closes an active grant (expired or revoked) and writes the ledger entry for what was left.
create function billing.close_credit_grant(grant_id uuid, new_status billing.credit_grant_status, reason text)
returns integer
language plpgsql
set search_path = ''
as $$
declare
  g billing.credit_grants;
begin
  select * into g from billing.credit_grants cg where cg.id = grant_id and cg.status = 'active' for update;
  if not found then
    return 0;
  end if;
  update billing.credit_grants set status = new_status, remaining = 0, status_reason = reason where id = g.id;
  if g.remaining > 0 then
    insert into billing.credit_entries (customer_id, user_id, grant_id, kind, amount, reason)
    values (g.customer_id, g.user_id, g.id,
            case new_status when 'revoked' then 'revoke'::billing.credit_entry_kind else 'expire' end,
            -g.remaining, reason);
  end if;
  return g.remaining;
end
$$;
revoke execute on function billing.close_credit_grant(uuid, billing.credit_grant_status, text) from public;
comment on function billing.close_credit_grant(uuid, billing.credit_grant_status, text) is
  'Expires or revokes an active credit grant, writing the ledger entry. Owner only. Raises nothing.';

-- ---------------------------------------------------------------------------------------------
-- Ending a subscription
-- ---------------------------------------------------------------------------------------------
create function billing.end_subscription(subscription_id uuid, final_status billing.subscription_status,
                                         open_period_status billing.period_status, reason text,
                                         ended_at timestamptz default null)
returns billing.subscriptions
language plpgsql
set search_path = ''
as $$
declare
  s billing.subscriptions;
  v_now timestamptz := billing.now();
  g record;
begin
  if final_status not in ('canceled', 'unpaid') or open_period_status not in ('unpaid', 'void') then
    raise exception 'end_subscription: bad final status % / %', final_status, open_period_status
      using errcode = 'SB400';
  end if;
  update billing.subscriptions su
     set status = final_status,
         status_reason = reason,
         ended_at = coalesce(end_subscription.ended_at, v_now),
         canceled_at = case when final_status = 'canceled'
                            then coalesce(su.canceled_at, su.cancel_requested_at, v_now) else su.canceled_at end,
         grace_ends_at = null,
         awaiting_card = false
   where su.id = end_subscription.subscription_id and su.status in ('incomplete', 'active', 'past_due')
  returning * into s;
  if not found then
    raise exception 'subscription % is not live; cannot end it (%)', subscription_id, reason
      using errcode = 'SB409';
  end if;
  update billing.billing_periods
     set status = open_period_status, status_reason = reason
   where billing_periods.subscription_id = s.id and status = 'open';
  perform billing.withdraw_attempts(s.id, 'subscription ended: ' || reason);
  perform billing.schedule_key_deletion(s.payment_method_id, 'subscription ended');
  -- Access ends now, and the credits with it.
  for g in select cg.id from billing.credit_grants cg
            where cg.subscription_id = s.id and cg.status = 'active' and cg.expires_at > v_now
  loop
    perform billing.close_credit_grant(g.id, 'expired', 'subscription ended');
  end loop;
  perform billing.notify_subscriber('canceled', s.id,
    pg_catalog.jsonb_build_object('status', s.status, 'reason', reason, 'endedAt', s.ended_at));
  return s;
end
$$;
revoke execute on function billing.end_subscription(uuid, billing.subscription_status, billing.period_status, text, timestamptz) from public;
comment on function billing.end_subscription(uuid, billing.subscription_status, billing.period_status, text, timestamptz) is
  'Ends a live subscription (canceled or unpaid): closes its open period, withdraws unsent attempts, '
  'expires remaining credits, queues the billing key''s deletion at Toss and notifies. Caller holds '
  'the subscription lock. Owner only. Raises SB409 when the subscription is not live.';

-- ---------------------------------------------------------------------------------------------
-- Payments: snapshot sync, refunds found in cancels[], charge success
-- ---------------------------------------------------------------------------------------------

create function billing.payment_cancels(payment jsonb)
returns jsonb
language sql
immutable
set search_path = ''
as $$
  select case when pg_catalog.jsonb_typeof(payment -> 'cancels') = 'array' then payment -> 'cancels'
              else '[]'::jsonb end
$$;
revoke execute on function billing.payment_cancels(jsonb) from public;
comment on function billing.payment_cancels(jsonb) is
  'A Toss Payment''s cancels[] as a JSON array (empty when null or absent). Owner only. Raises nothing.';

create function billing.cancel_count(payment jsonb)
returns integer
language sql
immutable
set search_path = ''
as $$
  select pg_catalog.jsonb_array_length(billing.payment_cancels(payment))
$$;
revoke execute on function billing.cancel_count(jsonb) from public;
comment on function billing.cancel_count(jsonb) is
  'Number of entries in a Toss Payment''s cancels[]. Owner only. Raises nothing.';

-- Applies a newer snapshot of a stored payment and matches its cancels[] to refund rows. Older
-- snapshots (larger balance) are ignored, so out-of-order deliveries converge.
create function billing.sync_payment(payment_id uuid, payment jsonb)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v record;
  pay billing.payments;
  c jsonb;
  v_refund uuid;
  v_matched integer := 0;
  v_external integer := 0;
  v_revoked integer := 0;
  v_grant uuid;
  v_stale boolean := false;
begin
  select * into v from billing.parse_payment(payment);
  select * into strict pay from billing.payments p where p.id = sync_payment.payment_id for update;
  if v.payment_key <> pay.payment_key then
    raise exception 'snapshot of payment % does not match payment %', v.payment_key, pay.id using errcode = 'SB400';
  end if;
  if v.total_amount <> pay.total_amount then
    raise exception 'payment % changed its totalAmount from % to %', pay.payment_key, pay.total_amount, v.total_amount
      using errcode = 'SB400';
  end if;
  if v.balance_amount > pay.balance_amount
     or (v.balance_amount = pay.balance_amount
         and billing.cancel_count(payment) < billing.cancel_count(pay.raw)) then
    v_stale := true;
  else
    update billing.payments p
       set status = v.status, balance_amount = v.balance_amount, raw = payment,
           secret = coalesce(v.secret, p.secret), receipt_url = coalesce(v.receipt_url, p.receipt_url),
           last_transaction_key = coalesce(v.last_transaction_key, p.last_transaction_key),
           method = coalesce(v.method, p.method), updated_at = billing.now()
     where p.id = pay.id
    returning * into pay;
  end if;

  -- Each DONE cancel is a refund: ours, matched by amount (refunds already sent first, so a cancel
  -- is never credited to one that has not been sent while another that has is waiting), or one
  -- made elsewhere (Toss's console).
  for c in select e from pg_catalog.jsonb_array_elements(billing.payment_cancels(pay.raw)) as e
  loop
    continue when coalesce(c ->> 'cancelStatus', 'DONE') <> 'DONE' or c ->> 'transactionKey' is null;
    continue when exists (select 1 from billing.refunds r where r.toss_transaction_key = c ->> 'transactionKey');
    select r.id into v_refund
      from billing.refunds r
     where r.payment_id = pay.id and r.status in ('requested', 'claimed', 'failed')
       and r.amount = (c ->> 'cancelAmount')::numeric
     order by (r.attempts > 0) desc, (r.status = 'failed'), r.created_at, r.id
     limit 1
       for update;
    if found then
      update billing.refunds r
         set status = 'succeeded', status_reason = 'cancel ' || (c ->> 'transactionKey') || ' at Toss',
             toss_transaction_key = c ->> 'transactionKey',
             canceled_at = (c ->> 'canceledAt')::timestamptz, lease_owner = null, lease_expires_at = null
       where r.id = v_refund;
      v_matched := v_matched + 1;
    else
      insert into billing.refunds (payment_id, user_id, amount, reason, source, status, status_reason,
                                   toss_transaction_key, canceled_at, requested_by)
      values (pay.id, pay.user_id, (c ->> 'cancelAmount')::numeric::bigint,
              coalesce(nullif(pg_catalog.left(c ->> 'cancelReason', 200), ''), 'canceled at Toss'),
              'external', 'succeeded', 'found in the payment''s cancels at Toss', c ->> 'transactionKey',
              (c ->> 'canceledAt')::timestamptz, billing.actor_role());
      v_external := v_external + 1;
      perform billing.raise_alert('refund made outside billing', 'payments', pay.id,
                                  pg_catalog.jsonb_build_object('transactionKey', c ->> 'transactionKey',
                                                                'amount', c -> 'cancelAmount'));
    end if;
    if pay.subscription_id is not null then
      perform billing.notify_subscriber('refunded', pay.subscription_id,
        pg_catalog.jsonb_build_object('paymentId', pay.id, 'amount', c -> 'cancelAmount',
                                      'balanceAmount', pay.balance_amount));
    end if;
  end loop;

  -- Fully refunded is balanceAmount = 0 (Toss may still say PARTIAL_CANCELED): credits go too.
  if pay.balance_amount = 0 and pay.applied then
    select cg.id into v_grant from billing.credit_grants cg where cg.payment_id = pay.id and cg.status = 'active';
    if found then
      v_revoked := billing.close_credit_grant(v_grant, 'revoked', 'payment fully refunded');
    end if;
  end if;

  return pg_catalog.jsonb_build_object('paymentId', pay.id, 'status', pay.status,
                                       'balanceAmount', pay.balance_amount, 'stale', v_stale,
                                       'refundsMatched', v_matched, 'refundsExternal', v_external,
                                       'creditsRevoked', v_revoked,
                                       'fullyRefunded', pay.balance_amount = 0);
end
$$;
revoke execute on function billing.sync_payment(uuid, jsonb) from public;
comment on function billing.sync_payment(uuid, jsonb) is
  'Applies a Toss Payment snapshot to a stored payment unless it is older; records each cancel as a '
  'refund (matching requested ones); revokes the period''s credits when balanceAmount reaches 0. '
  'Owner only. Raises SB400 when the snapshot is for another payment or malformed.';

-- Records an approved charge of an attempt. The payment pays its period only when that period is
-- still open on a live subscription and Toss charged exactly the attempt's amount; otherwise
-- (another attempt already paid it, the subscription ended meanwhile, or another amount was
-- charged) the payment is kept, marked not applied, and refunded in full.
create function billing.apply_charge_success(attempt_id uuid, payment jsonb)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v record;
  a billing.charge_attempts;
  s billing.subscriptions;
  p billing.billing_periods;
  pay billing.payments;
  v_applied boolean;
  v_was billing.subscription_status;
  v_now timestamptz := billing.now();
  v_sync jsonb;
  v_refund uuid;
  v_source billing.refund_source;
  v_wrong_amount boolean;
  v_status billing.attempt_status;
  v_after jsonb;
begin
  select * into v from billing.parse_payment(payment);
  select ca.subscription_id into s.id from billing.charge_attempts ca where ca.id = apply_charge_success.attempt_id;
  if not found then
    raise exception 'charge attempt % not found', attempt_id using errcode = 'SB404';
  end if;
  select * into strict s from billing.subscriptions su where su.id = s.id for update;
  select * into strict a from billing.charge_attempts ca where ca.id = apply_charge_success.attempt_id for update;
  select * into strict p from billing.billing_periods bp where bp.id = a.period_id for update;

  if v.order_id <> a.order_id then
    raise exception 'payment % is for order %, not attempt % (order %)', v.payment_key, v.order_id, a.id, a.order_id
      using errcode = 'SB400';
  end if;
  if v.status not in ('DONE', 'CANCELED', 'PARTIAL_CANCELED') or v.approved_at is null then
    raise exception 'payment % of attempt % is not approved (status %)', v.payment_key, a.id, v.status
      using errcode = 'SB400';
  end if;

  -- The same result again: refresh the snapshot, apply nothing twice.
  select * into pay from billing.payments where payments.attempt_id = a.id;
  if found then
    if pay.payment_key <> v.payment_key then
      raise exception 'attempt % already has payment %, not %', a.id, pay.payment_key, v.payment_key
        using errcode = 'SB409';
    end if;
    v_sync := billing.sync_payment(pay.id, payment);
    return pg_catalog.jsonb_build_object('attemptId', a.id, 'paymentId', pay.id, 'applied', pay.applied,
                                         'replay', true, 'attemptStatus', a.status, 'sync', v_sync);
  end if;
  if exists (select 1 from billing.payments where payments.payment_key = v.payment_key) then
    raise exception 'payment % is already recorded for another order', v.payment_key using errcode = 'SB409';
  end if;

  -- The amount is the period's price, fixed on the attempt; the service sends exactly that. Any
  -- other amount (a service bug, a forged body) never pays the period: the payment is still kept,
  -- since Toss holds the money and refusing it would leave the ledger short (re-sends replay the
  -- same answer, so it would never settle), but it is refunded in full, the attempt fails as a
  -- bug (no automatic retry) and operators are alerted.
  v_wrong_amount := v.total_amount <> a.amount;
  v_applied := not v_wrong_amount and p.status = 'open' and s.status in ('incomplete', 'active', 'past_due')
               and s.current_period_id = p.id;
  insert into billing.payments (payment_key, order_id, attempt_id, subscription_id, period_id, customer_id, user_id,
                                applied, status, method, total_amount, balance_amount, approved_at, secret,
                                receipt_url, last_transaction_key, raw)
  values (v.payment_key, v.order_id, a.id, a.subscription_id, a.period_id, s.customer_id, s.user_id,
          v_applied, v.status, v.method, v.total_amount, v.total_amount, v.approved_at, v.secret,
          v.receipt_url, v.last_transaction_key, payment)
  returning * into pay;

  -- One succeeded attempt per period, also for a period that ended unpaid and then saw two late
  -- approvals (the second is a duplicate of the first).
  v_status := case
    when v_wrong_amount then 'failed'::billing.attempt_status
    when p.status = 'paid'
         or exists (select 1 from billing.charge_attempts ca
                     where ca.period_id = p.id and ca.status = 'succeeded' and ca.id <> a.id) then 'duplicate'
    else 'succeeded' end;
  update billing.charge_attempts ca
     set status = v_status,
         status_reason = case v_status
           when 'failed' then 'approved for ' || v.total_amount || ' KRW instead of ' || ca.amount
           when 'duplicate' then 'approved, but period ' || p.id || ' already had a successful attempt'
           else 'approved as payment ' || v.payment_key end,
         claim_mode = null, lease_owner = null, lease_expires_at = null, resolved_at = v_now,
         classification = case when v_wrong_amount then 'bug'::billing.failure_class end,
         error_code = case when v_wrong_amount then 'AMOUNT_MISMATCH' else ca.error_code end,
         error_message = case when v_wrong_amount
                              then 'Toss approved ' || v.total_amount || ' KRW for an attempt of ' || ca.amount || ' KRW'
                              else ca.error_message end
   where ca.id = a.id and ca.status in ('queued', 'claimed', 'unknown', 'declined', 'failed', 'canceled')
  returning * into a;
  if not found then
    raise exception 'charge attempt % cannot record a success in its state', attempt_id using errcode = 'SB409';
  end if;

  if v_applied then
    update billing.billing_periods bp
       set status = 'paid', status_reason = 'paid by attempt ' || a.attempt_number, paid_at = v_now,
           payment_id = pay.id
     where bp.id = p.id and bp.status = 'open';
    v_was := s.status;
    update billing.subscriptions su
       set status = 'active', status_reason = 'period ' || p.period_index || ' paid',
           past_due_since = null, grace_ends_at = null, awaiting_card = false
     where su.id = s.id and su.status in ('incomplete', 'active', 'past_due');
    -- Other attempts of the period were only needed while it was unpaid.
    update billing.charge_attempts ca
       set status = 'canceled', status_reason = 'period paid by attempt ' || a.attempt_number, resolved_at = v_now
     where ca.period_id = p.id and ca.status = 'queued' and ca.sends = 0;
    perform billing.grant_period_credits(p.id, pay.id);
    perform billing.notify_subscriber(case when v_was = 'incomplete' then 'activated'::billing.notification_kind
                                           else 'renewed' end,
      s.id, pg_catalog.jsonb_build_object('periodIndex', p.period_index, 'periodStartsAt', p.starts_at,
                                          'periodEndsAt', p.ends_at, 'amount', pay.total_amount,
                                          'paymentId', pay.id, 'receiptUrl', pay.receipt_url));
  else
    v_source := case when v_wrong_amount then 'wrong_amount'::billing.refund_source
                     when p.status = 'paid' then 'duplicate_charge'
                     else 'late_charge' end;
    insert into billing.refunds (payment_id, user_id, amount, reason, source, requested_by, status_reason)
    values (pay.id, pay.user_id, pay.total_amount,
            case v_source when 'wrong_amount' then 'charged amount differs from the period amount'
                          when 'duplicate_charge' then 'duplicate charge for an already paid period'
                          else 'charge approved after the subscription ended' end,
            v_source, 'billing', 'refund of a charge that must not stand')
    returning id into v_refund;
    perform billing.raise_alert(case v_source when 'wrong_amount' then 'charged amount differs from the period amount'
                                              when 'duplicate_charge' then 'duplicate charge refunded'
                                              else 'late charge refunded' end,
                                'payments', pay.id,
                                pg_catalog.jsonb_build_object('attemptId', a.id, 'periodId', p.id,
                                                              'refundId', v_refund, 'amount', pay.total_amount,
                                                              'expected', a.amount));
    if v_wrong_amount then
      -- The period is still unpaid: past_due (when active) and the bug alert, as for any bug.
      v_after := billing.after_charge_failure(a.id);
    end if;
  end if;

  -- A payment first seen already (partly) canceled brings its refunds along.
  v_sync := billing.sync_payment(pay.id, payment);
  return pg_catalog.jsonb_build_object('attemptId', a.id, 'paymentId', pay.id, 'applied', v_applied,
                                       'replay', false, 'attemptStatus', a.status, 'refundId', v_refund,
                                       'wrongAmount', v_wrong_amount, 'next', v_after, 'sync', v_sync);
end
$$;
revoke execute on function billing.apply_charge_success(uuid, jsonb) from public;
comment on function billing.apply_charge_success(uuid, jsonb) is
  'Records an approved Toss payment for an attempt: pays the period, activates the subscription, grants '
  'credits and notifies; a second approval for a paid period (or one after the subscription ended) is '
  'recorded unapplied and refunded in full, and so is one for another amount than the attempt''s, '
  'which also fails the attempt as a bug (AMOUNT_MISMATCH) with an alert. Idempotent per attempt. Owner only. '
  'Raises SB404 (no attempt), SB400 (wrong order, not approved, malformed), SB409 (a different payment recorded).';

-- ---------------------------------------------------------------------------------------------
-- After a failed charge: dunning
-- ---------------------------------------------------------------------------------------------

-- An active subscription whose current period went unpaid becomes past_due now; its grace ends
-- after the plan's last dunning step (at once when the schedule is empty). With awaiting_card it
-- also stops automatic retries until a new card is registered (a flag already set stays set).
create function billing.mark_past_due(subscription_id uuid, reason text, awaiting_card boolean default false)
returns billing.subscriptions
language sql
set search_path = ''
as $$
  update billing.subscriptions su
     set status = 'past_due', status_reason = mark_past_due.reason, past_due_since = billing.now(),
         grace_ends_at = billing.add_local(billing.now(),
           coalesce((select pl.dunning_schedule[pg_catalog.cardinality(pl.dunning_schedule)]
                       from billing.plans pl where pl.id = su.plan_id), interval '0')),
         awaiting_card = su.awaiting_card or mark_past_due.awaiting_card
   where su.id = mark_past_due.subscription_id and su.status = 'active'
  returning su.*
$$;
revoke execute on function billing.mark_past_due(uuid, text, boolean) from public;
comment on function billing.mark_past_due(uuid, text, boolean) is
  'Turns an active subscription past_due now, with grace until the plan''s last dunning step; '
  'returns the row (null when it was not active). Caller holds the subscription lock. Owner only. '
  'Raises nothing.';

create function billing.after_charge_failure(attempt_id uuid)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  a billing.charge_attempts;
  s billing.subscriptions;
  p billing.billing_periods;
  pl billing.plans;
  v_now timestamptz := billing.now();
  v_failures integer;
  v_next billing.charge_attempts;
  v_next_at timestamptz;
  v_schedule_len integer;
begin
  -- Caller holds the subscription lock.
  select * into strict a from billing.charge_attempts ca where ca.id = after_charge_failure.attempt_id;
  select * into strict s from billing.subscriptions su where su.id = a.subscription_id;
  select * into strict p from billing.billing_periods bp where bp.id = a.period_id for update;
  select * into strict pl from billing.plans where plans.id = s.plan_id;
  v_schedule_len := pg_catalog.cardinality(pl.dunning_schedule);

  -- Nothing to schedule for an ended subscription, a period no longer current, or while another
  -- attempt of the period is still on its way.
  if s.status not in ('incomplete', 'active', 'past_due') or p.status <> 'open' or s.current_period_id <> p.id then
    return pg_catalog.jsonb_build_object('action', 'none', 'why', 'period not open on a live subscription');
  end if;
  if exists (select 1 from billing.charge_attempts ca
              where ca.period_id = p.id and ca.id <> a.id and ca.status in ('queued', 'claimed', 'unknown')) then
    return pg_catalog.jsonb_build_object('action', 'none', 'why', 'another attempt is in flight');
  end if;

  if s.status = 'active' then
    s := billing.mark_past_due(s.id, a.classification || ': ' || a.error_code);
  end if;

  if a.classification = 'bug' then
    perform billing.raise_alert('charge failed with a bug classification; no retry', 'charge_attempts', a.id,
      pg_catalog.jsonb_build_object('code', a.error_code, 'message', a.error_message, 'subscriptionId', s.id));
    return pg_catalog.jsonb_build_object('action', 'alert');
  end if;

  if a.classification = 'needs_new_card' or s.status = 'incomplete' then
    -- No automatic retries until the subscriber registers a card that works.
    update billing.subscriptions su
       set awaiting_card = true, status_reason = a.classification || ': ' || a.error_code
     where su.id = s.id and not su.awaiting_card;
    perform billing.notify_subscriber(
      case when a.classification = 'needs_new_card' then 'card_needed'::billing.notification_kind
           else 'payment_failed' end,
      s.id, pg_catalog.jsonb_build_object('code', a.error_code, 'message', a.error_message,
                                          'periodIndex', p.period_index, 'nextRetryAt', null,
                                          'graceEndsAt', s.grace_ends_at));
    return pg_catalog.jsonb_build_object('action', 'await_card', 'graceEndsAt', s.grace_ends_at);
  end if;

  -- Declined on a past_due subscription: the k-th failure of the period is retried at
  -- past_due_since + schedule[k]; after the last one the subscription ends.
  select pg_catalog.count(*) into v_failures
    from billing.charge_attempts ca where ca.period_id = p.id and ca.status in ('declined', 'failed');
  if v_failures > v_schedule_len then
    perform billing.end_subscription(s.id, pl.dunning_final_status, 'unpaid',
                                     'dunning exhausted after ' || v_failures || ' failed attempts ('
                                     || a.error_code || ')');
    return pg_catalog.jsonb_build_object('action', 'ended', 'status', pl.dunning_final_status);
  end if;
  v_next_at := greatest(v_now, billing.add_local(s.past_due_since, pl.dunning_schedule[v_failures]));
  if s.payment_method_id <> a.payment_method_id then
    v_next_at := v_now;  -- a new card since this attempt: try it at once
  end if;
  v_next := billing.create_attempt(p.id, v_next_at, 'dunning retry ' || v_failures || ' of ' || v_schedule_len);
  perform billing.notify_subscriber('payment_failed', s.id,
    pg_catalog.jsonb_build_object('code', a.error_code, 'message', a.error_message,
                                  'periodIndex', p.period_index, 'nextRetryAt', v_next_at));
  return pg_catalog.jsonb_build_object('action', 'retry', 'attemptId', v_next.id, 'notBefore', v_next_at);
end
$$;
revoke execute on function billing.after_charge_failure(uuid) from public;
comment on function billing.after_charge_failure(uuid) is
  'After a declined or failed attempt: past_due, then the next attempt on the plan''s dunning '
  'schedule, awaiting a new card, an alert, or the end of the subscription when the schedule is '
  'exhausted. Caller holds the subscription lock. Owner only. Raises nothing of its own.';

-- ---------------------------------------------------------------------------------------------
-- A new card for a live subscription
-- ---------------------------------------------------------------------------------------------
create function billing.replace_card(subscription_id uuid, payment_method_id uuid)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  s billing.subscriptions;
  v_old uuid;
  v_attempt billing.charge_attempts;
begin
  select * into strict s from billing.subscriptions su where su.id = replace_card.subscription_id for update;
  v_old := s.payment_method_id;
  update billing.payment_methods pm
     set status = 'replaced', status_reason = 'replaced by payment method ' || replace_card.payment_method_id,
         replaced_at = billing.now()
   where pm.id = v_old and pm.status = 'active';
  perform billing.schedule_key_deletion(v_old, 'replaced by a new card');
  -- Attempts not yet sent go with the old card; ones already sent are resolved on it.
  update billing.charge_attempts ca
     set status = 'canceled', status_reason = 'card replaced', resolved_at = billing.now()
   where ca.subscription_id = s.id and ca.status = 'queued' and ca.sends = 0;
  update billing.subscriptions su
     set payment_method_id = replace_card.payment_method_id, awaiting_card = false,
         status_reason = 'card replaced'
   where su.id = s.id
  returning * into s;
  -- An unpaid current period is charged on the new card right away; for an active subscription that
  -- is a renewal whose unsent attempt just went with the old card (leaving it would give the period
  -- away and stall the subscription).
  if s.status in ('incomplete', 'active', 'past_due')
     and exists (select 1 from billing.billing_periods bp where bp.id = s.current_period_id and bp.status = 'open')
     and not exists (select 1 from billing.charge_attempts ca
                      where ca.period_id = s.current_period_id and ca.status in ('queued', 'claimed', 'unknown')) then
    v_attempt := billing.create_attempt(s.current_period_id, billing.now(), 'new card registered');
  end if;
  perform billing.notify_subscriber('card_replaced', s.id,
    pg_catalog.jsonb_build_object('paymentMethodId', payment_method_id, 'chargeAttemptId', v_attempt.id));
  return pg_catalog.jsonb_build_object('subscriptionId', s.id, 'replacedPaymentMethodId', v_old,
                                       'attemptId', v_attempt.id);
end
$$;
revoke execute on function billing.replace_card(uuid, uuid) from public;
comment on function billing.replace_card(uuid, uuid) is
  'Switches a live subscription to a new payment method: the old one is replaced and queued for '
  'deletion at Toss, unsent attempts are withdrawn, and an unpaid current period is charged on the '
  'new card right away. Owner only. Raises nothing of its own.';
