-- The subscriber API (schema api): what a signed-in user may call through Supabase RPC. Each
-- function is security definer (tables are private), checks the JWT "sub" first, touches only
-- that user's rows, and is granted to authenticated alone. SQLSTATEs: see
-- 20261121200100_billing_core.sql.

create function billing.require_sub()
returns text
language plpgsql
stable
set search_path = ''
as $$
declare
  v_sub text := billing.jwt_sub();
begin
  if v_sub is null then
    raise exception 'not signed in' using errcode = 'SB401';
  end if;
  if pg_catalog.length(v_sub) > 255 then
    raise exception 'JWT sub is longer than 255 characters' using errcode = 'SB400';
  end if;
  return v_sub;
end
$$;
revoke execute on function billing.require_sub() from public;
comment on function billing.require_sub() is
  'The caller''s JWT sub. Owner only (used by api functions). Raises SB401 when absent, SB400 when too long.';

-- What a subscriber sees of a subscription.
create function billing.subscription_json(subscription_id uuid)
returns jsonb
language sql
stable
set search_path = ''
as $$
  select pg_catalog.jsonb_build_object(
    'subscriptionId', s.id,
    'status', s.status,
    'plan', pg_catalog.jsonb_build_object('code', pl.code, 'name', pl.name, 'creditsPerPeriod', pl.credits_per_period),
    'currentPeriod', pg_catalog.jsonb_build_object('index', bp.period_index, 'startsAt', bp.starts_at,
                                                   'endsAt', bp.ends_at, 'amount', bp.amount, 'status', bp.status),
    'billingAnchor', s.billing_anchor,
    'anchorDay', s.anchor_day,
    'cancelAtPeriodEnd', s.cancel_at_period_end,
    'cancelRequestedAt', s.cancel_requested_at,
    'canceledAt', s.canceled_at,
    'endedAt', s.ended_at,
    'pastDueSince', s.past_due_since,
    'graceEndsAt', s.grace_ends_at,
    'awaitingCard', s.awaiting_card,
    'nextChargeAt', case
      when s.status = 'active' and not s.cancel_at_period_end then s.current_period_ends_at
      when s.status in ('incomplete', 'past_due') then
        (select min(ca.not_before) from billing.charge_attempts ca
          where ca.period_id = s.current_period_id and ca.status in ('queued', 'unknown', 'claimed'))
    end,
    'card', pg_catalog.jsonb_build_object('numberMasked', pm.card_number_masked, 'issuerCode', pm.issuer_code,
                                          'cardType', pm.card_type, 'status', pm.status))
    from billing.subscriptions s
    join billing.plans pl on pl.id = s.plan_id
    left join billing.billing_periods bp on bp.id = s.current_period_id
    left join billing.payment_methods pm on pm.id = s.payment_method_id
   where s.id = subscription_json.subscription_id
$$;
revoke execute on function billing.subscription_json(uuid) from public;
comment on function billing.subscription_json(uuid) is
  'The subscriber-facing JSON of a subscription. Owner only. Raises nothing.';

create function billing.credit_balance(customer_id uuid)
returns integer
language sql
stable
set search_path = ''
as $$
  select coalesce(sum(cg.remaining), 0)::integer
    from billing.credit_grants cg
   where cg.customer_id = credit_balance.customer_id and cg.status = 'active' and cg.expires_at > billing.now()
$$;
revoke execute on function billing.credit_balance(uuid) from public;
comment on function billing.credit_balance(uuid) is
  'Credits a customer can use now (active, unexpired grants). Owner only. Raises nothing.';

-- ---------------------------------------------------------------------------------------------
create function api.begin_registration(plan text default 'pro')
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_sub text := billing.require_sub();
  v_claims jsonb := auth.jwt();
  v_plan billing.plans;
  v_price billing.plan_prices;
  c billing.customers;
  s billing.subscriptions;
  r billing.card_registrations;
  v_now timestamptz := billing.now();
  v_email text;
  v_name text;
begin
  if plan is null or pg_catalog.length(plan) not between 1 and 32 then
    raise exception 'plan must be a plan code' using errcode = 'SB400';
  end if;
  select * into v_plan from billing.plans p where p.code = begin_registration.plan and p.active;
  if not found then
    raise exception 'plan % not found', plan using errcode = 'SB404';
  end if;
  v_price := billing.price_at(v_plan.id, v_now);
  v_email := nullif(v_claims ->> 'email', '');
  v_name := nullif(coalesce(v_claims -> 'user_metadata' ->> 'full_name', v_claims -> 'user_metadata' ->> 'name'), '');
  if pg_catalog.length(v_email) > 100 then v_email := null; end if;
  if pg_catalog.length(v_name) > 100 then v_name := pg_catalog.left(v_name, 100); end if;

  insert into billing.customers as cu (user_id, email, name)
  values (v_sub, v_email, v_name)
  on conflict on constraint customers_user_id_key
  do update set email = coalesce(excluded.email, cu.email), name = coalesce(excluded.name, cu.name)
  returning * into c;

  select * into s from billing.subscriptions su
   where su.customer_id = c.id and su.status in ('incomplete', 'active', 'past_due');
  if found and s.plan_id <> v_plan.id then
    raise exception 'subscription % is on another plan; plan changes are not supported', s.id using errcode = 'SB422';
  end if;
  -- Bounds what one user can pile up; each expires after an hour anyway.
  if (select pg_catalog.count(*) from billing.card_registrations cr
       where cr.customer_id = c.id and cr.status = 'pending' and cr.expires_at > v_now) >= 5 then
    raise exception 'too many card registrations in progress; try again later' using errcode = 'SB422';
  end if;

  insert into billing.card_registrations (customer_id, user_id, plan_id, customer_key, expires_at, status_reason)
  values (c.id, v_sub, v_plan.id, 'ck_' || pg_catalog.encode(extensions.gen_random_bytes(16), 'hex'),
          v_now + interval '1 hour', case when s.id is null then 'new subscription' else 'card replacement' end)
  returning * into r;

  return pg_catalog.jsonb_build_object(
    'registrationId', r.id,
    'customerKey', r.customer_key,
    'expiresAt', r.expires_at,
    'amount', v_price.amount,
    'currency', 'KRW',
    'orderName', billing.order_name(v_plan.name, v_now, billing.period_start(v_now, 1)),
    'customerEmail', c.email,
    'customerName', c.name,
    'replacesCard', s.id is not null,
    'plan', pg_catalog.jsonb_build_object('code', v_plan.code, 'name', v_plan.name, 'amount', v_price.amount,
                                          'currency', v_plan.currency, 'interval', v_plan.billing_interval,
                                          'creditsPerPeriod', v_plan.credits_per_period));
end
$$;
revoke execute on function api.begin_registration(text) from public;
grant execute on function api.begin_registration(text) to authenticated;
comment on function api.begin_registration(text) is
  'Subscriber: starts a card registration for a plan (or a card replacement for the live '
  'subscription) and returns what the Toss SDK needs: a fresh unguessable customerKey bound to the '
  'caller (expires in 1 hour), amount, orderName and plan details. authenticated only. Raises SB401 '
  '(not signed in), SB400 (bad plan code), SB404 (unknown plan), SB422 (other plan than the live '
  'subscription, 5 registrations pending, no price).';

create function api.my_subscription()
returns jsonb
language plpgsql
stable
security definer
set search_path = ''
as $$
declare
  v_sub text := billing.require_sub();
  v_id uuid;
begin
  -- The live subscription, else the most recent one.
  select su.id into v_id
    from billing.subscriptions su
   where su.user_id = v_sub
   order by (su.status in ('incomplete', 'active', 'past_due')) desc, su.created_at desc, su.id desc
   limit 1;
  if v_id is null then
    return null;
  end if;
  return billing.subscription_json(v_id);
end
$$;
revoke execute on function api.my_subscription() from public;
grant execute on function api.my_subscription() to authenticated;
comment on function api.my_subscription() is
  'Subscriber: the caller''s live subscription (else the latest one; null if none): status, plan, '
  'current period, cancel flags, next charge, card. authenticated only. Raises SB401.';

create function api.my_payments()
returns jsonb
language plpgsql
stable
security definer
set search_path = ''
as $$
declare
  v_sub text := billing.require_sub();
begin
  return coalesce((
    select pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
             'paymentId', p.id, 'orderId', p.order_id, 'status', p.status, 'totalAmount', p.total_amount,
             'balanceAmount', p.balance_amount, 'approvedAt', p.approved_at, 'receiptUrl', p.receipt_url,
             'periodIndex', bp.period_index, 'periodStartsAt', bp.starts_at, 'periodEndsAt', bp.ends_at,
             'refunds', coalesce((select pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
                                          'amount', r.amount, 'status', r.status, 'canceledAt', r.canceled_at)
                                        order by r.created_at, r.id)
                                    from billing.refunds r where r.payment_id = p.id), '[]'::jsonb))
           order by p.approved_at desc, p.id desc)
      from billing.payments p
      left join billing.billing_periods bp on bp.id = p.period_id
     where p.user_id = v_sub), '[]'::jsonb);
end
$$;
revoke execute on function api.my_payments() from public;
grant execute on function api.my_payments() to authenticated;
comment on function api.my_payments() is
  'Subscriber: the caller''s payments, newest first, with their periods and refunds (JSON array). '
  'authenticated only. Raises SB401.';

create function api.my_credits()
returns jsonb
language plpgsql
stable
security definer
set search_path = ''
as $$
declare
  v_sub text := billing.require_sub();
  c billing.customers;
begin
  select * into c from billing.customers cu where cu.user_id = v_sub;
  if not found then
    return pg_catalog.jsonb_build_object('balance', 0, 'grants', '[]'::jsonb, 'entries', '[]'::jsonb);
  end if;
  return pg_catalog.jsonb_build_object(
    'balance', billing.credit_balance(c.id),
    'grants', coalesce((select pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
                                 'grantId', g.id, 'amount', g.amount, 'remaining', g.remaining, 'status', g.status,
                                 'grantedAt', g.granted_at, 'expiresAt', g.expires_at)
                               order by g.expires_at desc)
                          from billing.credit_grants g where g.customer_id = c.id), '[]'::jsonb),
    'entries', coalesce((select pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
                                  'entryId', e.id, 'kind', e.kind, 'amount', e.amount, 'reason', e.reason,
                                  'at', e.created_at)
                                order by e.id desc)
                           from (select * from billing.credit_entries ce where ce.customer_id = c.id
                                  order by ce.id desc limit 200) e), '[]'::jsonb));
end
$$;
revoke execute on function api.my_credits() from public;
grant execute on function api.my_credits() to authenticated;
comment on function api.my_credits() is
  'Subscriber: the caller''s usable credit balance, grants and the latest 200 ledger entries. '
  'authenticated only. Raises SB401.';

create function api.cancel_subscription()
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_sub text := billing.require_sub();
  s billing.subscriptions;
  v_now timestamptz := billing.now();
begin
  select * into s from billing.subscriptions su
   where su.user_id = v_sub and su.status in ('incomplete', 'active', 'past_due') for update;
  if not found then
    raise exception 'no live subscription to cancel' using errcode = 'SB404';
  end if;
  -- Access continues only until the end of a period that was paid for. An active subscription
  -- whose renewal is still being charged has no such period left: it ends now like an unpaid one.
  if s.status = 'active' and exists (select 1 from billing.billing_periods bp
                                      where bp.id = s.current_period_id and bp.status = 'paid') then
    if s.cancel_at_period_end then
      return billing.subscription_json(s.id);
    end if;
    update billing.subscriptions su
       set cancel_at_period_end = true, cancel_requested_at = v_now, status_reason = 'cancel requested by subscriber'
     where su.id = s.id and su.status = 'active' and not su.cancel_at_period_end
    returning * into s;
    perform billing.notify_subscriber('cancel_scheduled', s.id,
      pg_catalog.jsonb_build_object('endsAt', s.current_period_ends_at));
  else
    -- Nothing paid for the current period: end now rather than keep charging a leaving subscriber.
    -- An attempt already on its way to Toss cannot be withdrawn; if it is approved, the late charge
    -- is refunded in full, and a decline finds no live subscription to dun.
    update billing.subscriptions su
       set cancel_requested_at = v_now
     where su.id = s.id and su.status in ('incomplete', 'active', 'past_due');
    perform billing.end_subscription(s.id, 'canceled', 'void', 'canceled by subscriber while ' || s.status);
  end if;
  return billing.subscription_json(s.id);
end
$$;
revoke execute on function api.cancel_subscription() from public;
grant execute on function api.cancel_subscription() to authenticated;
comment on function api.cancel_subscription() is
  'Subscriber: cancels the caller''s subscription — at the end of the current period when it is paid '
  '(repeating it changes nothing), at once when the current period is unpaid (incomplete, past_due, '
  'or a renewal still being charged). Returns the subscription. authenticated only. Raises SB401, '
  'SB404 (no live subscription).';

create function api.resume_subscription()
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_sub text := billing.require_sub();
  s billing.subscriptions;
begin
  select * into s from billing.subscriptions su
   where su.user_id = v_sub and su.status in ('incomplete', 'active', 'past_due') for update;
  if not found then
    raise exception 'no live subscription to resume' using errcode = 'SB404';
  end if;
  update billing.subscriptions su
     set cancel_at_period_end = false, cancel_requested_at = null, status_reason = 'resumed by subscriber'
   where su.id = s.id and su.status = 'active' and su.cancel_at_period_end
     and su.current_period_ends_at > billing.now()
  returning * into s;
  if not found then
    raise exception 'subscription % is not scheduled to cancel (or its period has ended)', s.id
      using errcode = 'SB409';
  end if;
  perform billing.notify_subscriber('resumed', s.id,
    pg_catalog.jsonb_build_object('nextChargeAt', s.current_period_ends_at));
  return billing.subscription_json(s.id);
end
$$;
revoke execute on function api.resume_subscription() from public;
grant execute on function api.resume_subscription() to authenticated;
comment on function api.resume_subscription() is
  'Subscriber: withdraws a cancellation scheduled for the end of the period, before it ends. '
  'authenticated only. Raises SB401, SB404 (no live subscription), SB409 (not scheduled to cancel, '
  'or the period already ended).';

create function api.consume_credit(reason text)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_sub text := billing.require_sub();
  c billing.customers;
  g billing.credit_grants;
  v_entry bigint;
  v_now timestamptz := billing.now();
begin
  if reason is null or pg_catalog.length(pg_catalog.btrim(reason)) = 0 or pg_catalog.length(reason) > 200 then
    raise exception 'reason must be 1–200 characters' using errcode = 'SB400';
  end if;
  -- One consumer at a time per customer: the balance cannot be spent twice.
  select * into c from billing.customers cu where cu.user_id = v_sub for update;
  if not found then
    raise exception 'no credits left' using errcode = 'SB422';
  end if;
  update billing.credit_grants cg
     set remaining = cg.remaining - 1
   where cg.id = (select x.id from billing.credit_grants x
                   where x.customer_id = c.id and x.status = 'active' and x.remaining > 0 and x.expires_at > v_now
                   order by x.expires_at, x.id
                   limit 1)
     and cg.remaining > 0
  returning * into g;
  if not found then
    raise exception 'no credits left' using errcode = 'SB422';
  end if;
  insert into billing.credit_entries (customer_id, user_id, grant_id, kind, amount, reason)
  values (c.id, c.user_id, g.id, 'consume', -1, reason)
  returning id into v_entry;
  return pg_catalog.jsonb_build_object('entryId', v_entry, 'grantId', g.id, 'balance', billing.credit_balance(c.id));
end
$$;
revoke execute on function api.consume_credit(text) from public;
grant execute on function api.consume_credit(text) to authenticated;
comment on function api.consume_credit(text) is
  'Subscriber: spends one credit (the one expiring first) for the given reason, atomically; the '
  'balance never goes below zero. Returns the entry and the new balance. authenticated only. '
  'Raises SB401, SB400 (reason empty or over 200 characters), SB422 (no credits left).';
