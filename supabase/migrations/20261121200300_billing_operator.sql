-- Operator functions: refunds, price versions, immediate cancellation, a manual retry. For support
-- staff and operator tooling connected as the owner (postgres); neither subscribers nor the
-- service role may call them. SQLSTATEs: see 20261121200100_billing_core.sql.

-- The reason an operator gives (kept with the refund, the attempt or the subscription's end).
create function billing.check_reason(reason text)
returns void
language plpgsql
immutable
set search_path = ''
as $$
begin
  if reason is null or pg_catalog.length(reason) not between 1 and 200 then
    raise exception 'reason must be 1–200 characters' using errcode = 'SB400';
  end if;
end
$$;
revoke execute on function billing.check_reason(text) from public;
comment on function billing.check_reason(text) is
  'Validates an operator''s reason (1–200 characters). Owner only. Raises SB400.';

-- What is still refundable on a payment: its balance less the refunds requested or in flight.
create function billing.refundable_amount(pay billing.payments)
returns bigint
language sql
stable
set search_path = ''
as $$
  select (pay.balance_amount - coalesce(sum(x.amount), 0))::bigint
    from billing.refunds x
   where x.payment_id = pay.id and x.status in ('requested', 'claimed')
$$;
revoke execute on function billing.refundable_amount(billing.payments) from public;
comment on function billing.refundable_amount(billing.payments) is
  'A payment''s balance less its requested and claimed refunds: what may still be refunded. '
  'Owner only. Raises nothing.';

-- Creates a refund request after checking what is still refundable. Caller holds no locks.
create function billing.create_refund(payment_id uuid, amount bigint, reason text, source billing.refund_source)
returns billing.refunds
language plpgsql
set search_path = ''
as $$
declare
  pay billing.payments;
  v_refundable bigint;
  v_amount bigint := amount;
  r billing.refunds;
begin
  if payment_id is null then
    raise exception 'payment_id is required' using errcode = 'SB400';
  end if;
  perform billing.check_reason(reason);
  if v_amount is not null and v_amount <= 0 then
    raise exception 'refund amount must be positive, got %', v_amount using errcode = 'SB400';
  end if;
  select * into pay from billing.payments p where p.id = create_refund.payment_id for update;
  if not found then
    raise exception 'payment % not found', payment_id using errcode = 'SB404';
  end if;
  if pay.status not in ('DONE', 'PARTIAL_CANCELED') then
    raise exception 'payment % is % and cannot be refunded', pay.id, pay.status using errcode = 'SB409';
  end if;
  v_refundable := billing.refundable_amount(pay);
  if v_refundable <= 0 then
    raise exception 'payment % has nothing left to refund (balance %, pending %)', pay.id, pay.balance_amount,
      pay.balance_amount - v_refundable
      using errcode = 'SB422';
  end if;
  v_amount := coalesce(v_amount, v_refundable);
  if v_amount > v_refundable then
    raise exception 'refund of % KRW exceeds the % KRW still refundable on payment %', v_amount, v_refundable, pay.id
      using errcode = 'SB422';
  end if;
  insert into billing.refunds (payment_id, user_id, amount, reason, source, requested_by, status_reason)
  values (pay.id, pay.user_id, v_amount, reason, source, billing.actor_role(), reason)
  returning * into r;
  return r;
end
$$;
revoke execute on function billing.create_refund(uuid, bigint, text, billing.refund_source) from public;
comment on function billing.create_refund(uuid, bigint, text, billing.refund_source) is
  'Queues a refund of a payment (null amount = all that is still refundable). Owner only. Raises '
  'SB400 (bad input), SB404 (unknown payment), SB409 (payment not refundable), SB422 (amount too large).';

create function billing.request_refund(payment_id uuid, amount bigint default null,
                                       reason text default 'requested by support')
returns uuid
language plpgsql
security definer
set search_path = ''
as $$
begin
  return (billing.create_refund(payment_id, amount, reason, 'operator')).id;
end
$$;
revoke execute on function billing.request_refund(uuid, bigint, text) from public;
comment on function billing.request_refund(uuid, bigint, text) is
  'Operator: requests a full (amount null = everything still refundable) or partial refund of a '
  'payment; returns the refund id, which the service sends as Idempotency-Key. Credits of the '
  'period are revoked once the payment is fully refunded. Owner (postgres) only. Raises SB400, '
  'SB404 (unknown payment), SB409 (payment not DONE/PARTIAL_CANCELED), SB422 (more than refundable).';

create function billing.change_plan_price(plan text, amount bigint, effective_from timestamptz)
returns uuid
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_plan billing.plans;
  v_id uuid;
begin
  if amount is null or amount not between 100 and 100000000 then
    raise exception 'amount must be between 100 and 100,000,000 KRW, got %', amount using errcode = 'SB400';
  end if;
  if effective_from is null or not pg_catalog.isfinite(effective_from) then
    raise exception 'effective_from must be a finite timestamp' using errcode = 'SB400';
  end if;
  select * into v_plan from billing.plans p where p.code = change_plan_price.plan;
  if not found then
    raise exception 'plan % not found', plan using errcode = 'SB404';
  end if;
  -- Periods already created keep their amount; a price cannot reach back in time: not into the
  -- past, and not over a period that exists already (one starting now, or later than a test clock
  -- that was moved back), whose amount would then differ from the price at its start.
  if effective_from < billing.now() then
    raise exception 'effective_from % is in the past', effective_from using errcode = 'SB422';
  end if;
  if exists (select 1 from billing.billing_periods bp
               join billing.subscriptions su on su.id = bp.subscription_id
              where su.plan_id = v_plan.id and bp.starts_at >= change_plan_price.effective_from) then
    raise exception 'plan % has periods starting at or after %; their amounts are fixed', plan, effective_from
      using errcode = 'SB422';
  end if;
  if exists (select 1 from billing.plan_prices pp
              where pp.plan_id = v_plan.id and pp.effective_from = change_plan_price.effective_from) then
    raise exception 'plan % already has a price effective from %', plan, effective_from using errcode = 'SB409';
  end if;
  insert into billing.plan_prices (plan_id, amount, effective_from)
  values (v_plan.id, amount, effective_from)
  returning id into v_id;
  perform billing.log_event('plan_prices', v_id, 'price_added', null,
    pg_catalog.jsonb_build_object('plan', v_plan.code, 'amount', amount, 'effectiveFrom', effective_from));
  return v_id;
end
$$;
revoke execute on function billing.change_plan_price(text, bigint, timestamptz) from public;
comment on function billing.change_plan_price(text, bigint, timestamptz) is
  'Operator: adds a price version for a plan; periods starting on or after effective_from are '
  'charged the new amount. Owner (postgres) only. Raises SB400 (amount outside 100–100,000,000, '
  'bad time), SB404 (unknown plan), SB409 (a version at that instant exists), SB422 (in the past, '
  'or not after the start of an existing period of the plan).';

create function billing.cancel_subscription_now(subscription_id uuid, prorate_refund boolean default false,
                                                reason text default 'canceled by support')
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  s billing.subscriptions;
  p billing.billing_periods;
  pay billing.payments;
  v_now timestamptz := billing.now();
  v_total_secs bigint;
  v_left_secs bigint;
  v_amount bigint := 0;
  r billing.refunds;
begin
  if subscription_id is null then
    raise exception 'subscription_id is required' using errcode = 'SB400';
  end if;
  perform billing.check_reason(reason);
  select * into s from billing.subscriptions su where su.id = cancel_subscription_now.subscription_id for update;
  if not found then
    raise exception 'subscription % not found', subscription_id using errcode = 'SB404';
  end if;
  if s.status not in ('incomplete', 'active', 'past_due') then
    raise exception 'subscription % is already %', s.id, s.status using errcode = 'SB409';
  end if;

  if coalesce(prorate_refund, false) then
    select * into p from billing.billing_periods bp where bp.id = s.current_period_id;
    if p.status = 'paid' and v_now < p.ends_at then
      select * into strict pay from billing.payments x where x.id = p.payment_id;
      -- The unused share of the period, in whole seconds, in integer KRW rounded down.
      v_total_secs := pg_catalog.floor(extract(epoch from (p.ends_at - p.starts_at)))::bigint;
      v_left_secs := pg_catalog.floor(extract(epoch from (p.ends_at - greatest(v_now, p.starts_at))))::bigint;
      v_amount := (p.amount * v_left_secs) / v_total_secs;
      v_amount := least(v_amount, billing.refundable_amount(pay));
      if v_amount > 0 then
        r := billing.create_refund(pay.id, v_amount,
                                   pg_catalog.left('prorated: ' || reason, 200), 'prorated_cancel');
      end if;
    end if;
  end if;

  s := billing.end_subscription(s.id, 'canceled', 'void', reason);
  return pg_catalog.jsonb_build_object('subscriptionId', s.id, 'status', s.status, 'endedAt', s.ended_at,
                                       'refundId', r.id, 'refundAmount', coalesce(r.amount, 0));
end
$$;
revoke execute on function billing.cancel_subscription_now(uuid, boolean, text) from public;
comment on function billing.cancel_subscription_now(uuid, boolean, text) is
  'Operator: ends a live subscription now (access and credits end, the billing key is queued for '
  'deletion) and, with prorate_refund, refunds the unused share of the paid current period: '
  'floor(amount × seconds left ÷ period seconds) KRW. Owner (postgres) only. Raises SB400, SB404 '
  '(unknown subscription), SB409 (not live).';

create function billing.retry_subscription_charge(subscription_id uuid, reason text default 'retry by support')
returns uuid
language plpgsql
security definer
set search_path = ''
as $$
declare
  s billing.subscriptions;
  a billing.charge_attempts;
begin
  perform billing.check_reason(reason);
  select * into s from billing.subscriptions su where su.id = retry_subscription_charge.subscription_id for update;
  if not found then
    raise exception 'subscription % not found', subscription_id using errcode = 'SB404';
  end if;
  if s.status not in ('incomplete', 'past_due')
     or not exists (select 1 from billing.billing_periods bp where bp.id = s.current_period_id and bp.status = 'open') then
    raise exception 'subscription % (%) has no unpaid current period', s.id, s.status using errcode = 'SB409';
  end if;
  if exists (select 1 from billing.charge_attempts ca
              where ca.period_id = s.current_period_id and ca.status in ('queued', 'claimed', 'unknown')) then
    raise exception 'subscription % already has an attempt in flight', s.id using errcode = 'SB409';
  end if;
  if not exists (select 1 from billing.payment_methods pm where pm.id = s.payment_method_id and pm.status = 'active') then
    raise exception 'subscription % has no usable card', s.id using errcode = 'SB422';
  end if;
  a := billing.create_attempt(s.current_period_id, billing.now(), pg_catalog.left('manual retry: ' || reason, 200));
  return a.id;
end
$$;
revoke execute on function billing.retry_subscription_charge(uuid, text) from public;
comment on function billing.retry_subscription_charge(uuid, text) is
  'Operator: queues a new attempt now for the unpaid current period (e.g. after fixing the cause of '
  'a ''bug'' failure). Owner (postgres) only. Raises SB400, SB404 (unknown subscription), SB409 (no '
  'unpaid period or an attempt in flight), SB422 (no active card).';

create function billing.configure_plan_dunning(plan text, schedule interval[], final_status text)
returns void
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_id uuid;
begin
  if final_status is null or final_status not in ('canceled', 'unpaid') then
    raise exception 'final_status must be canceled or unpaid, got %', final_status using errcode = 'SB400';
  end if;
  if not coalesce(billing.dunning_schedule_is_valid(schedule), false) then
    raise exception 'schedule must be 0–10 increasing offsets between 0 and 60 days, got %', schedule
      using errcode = 'SB400';
  end if;
  update billing.plans p
     set dunning_schedule = schedule, dunning_final_status = final_status::billing.subscription_status
   where p.code = configure_plan_dunning.plan
  returning p.id into v_id;
  if v_id is null then
    raise exception 'plan % not found', plan using errcode = 'SB404';
  end if;
  perform billing.log_event('plans', v_id, 'dunning_configured', null,
    pg_catalog.jsonb_build_object('schedule', schedule, 'finalStatus', final_status));
end
$$;
revoke execute on function billing.configure_plan_dunning(text, interval[], text) from public;
comment on function billing.configure_plan_dunning(text, interval[], text) is
  'Operator: sets a plan''s dunning schedule (offsets from the first failed charge of a period) and '
  'the status a subscription ends in when it is exhausted (canceled or unpaid); applies to failures '
  'from now on. Owner (postgres) only. Raises SB400 (bad schedule or status), SB404 (unknown plan).';
