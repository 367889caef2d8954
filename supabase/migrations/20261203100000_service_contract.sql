-- The contract between the database and the billing service, and the holes it closes.
--
-- * Fencing: every claim hands out a lease_token; every service_record_* takes it back and refuses
--   a token that is not the current one (SB409, nothing changed). Facts about money or the outside
--   world — an approval, a refund Toss made, a key Toss deleted, a notification delivered — are
--   recorded whoever reports them.
-- * At most one attempt per period is in flight (queued, claimed or unknown): a unique index.
-- * Claims lock the subscription with the attempt (SKIP LOCKED), so a claim and a subscriber's
--   cancel serialise; a charge goes out only on the subscription's active card while nothing stops
--   it (cancel pending, awaiting a card).
-- * Failure classes: only 'unprocessed' (409 IDEMPOTENT_REQUEST_PROCESSING, 429) is re-sent under
--   the same Idempotency-Key. A processed error ('transient', 'reconcile') spends the key: the
--   order is looked up, and when nothing was charged the attempt fails and a new attempt (new
--   orderId and key) follows after a backoff, at most three per period before dunning.
-- * The billing key reaches the database only as the service's envelope (checked here).
-- * The webhook inbox never stores a billing key or a header outside an allow-list.
-- * Every service_record_* returns one composite, billing.recorded.
-- SQLSTATEs: see 20261121200100_billing_core.sql.

-- ---------------------------------------------------------------------------------------------
-- Fencing tokens: one column, one meaning, on every work queue
-- ---------------------------------------------------------------------------------------------
alter table billing.charge_attempts add column lease_token uuid;
alter table billing.refunds add column lease_token uuid;
alter table billing.webhook_events add column lease_token uuid;
alter table billing.key_deletions add column lease_token uuid;
alter table billing.notifications add column lease_token uuid;

-- Work leased while this migration runs gets a token too, or the checks below would refuse the
-- existing rows (a notification keeps its lease_owner until delivered). Results for it can only
-- come back through the new signatures, so its holder's report is refused and the work is claimed
-- again once the lease expires.
update billing.charge_attempts set lease_token = pg_catalog.gen_random_uuid() where status = 'claimed';
update billing.refunds set lease_token = pg_catalog.gen_random_uuid() where status = 'claimed';
update billing.webhook_events set lease_token = pg_catalog.gen_random_uuid() where status = 'processing';
update billing.key_deletions set lease_token = pg_catalog.gen_random_uuid() where status = 'claimed';
update billing.notifications set lease_token = pg_catalog.gen_random_uuid() where lease_owner is not null;

-- The token of the latest claim stays on the row after the lease ends, so the holder of that
-- claim can repeat its result (a lost reply) and anyone else is refused.
alter table billing.charge_attempts
  add constraint charge_attempts_lease_token_check check (status <> 'claimed' or lease_token is not null);
alter table billing.refunds
  add constraint refunds_lease_token_check check (status <> 'claimed' or lease_token is not null);
alter table billing.webhook_events
  add constraint webhook_events_lease_token_check check (status <> 'processing' or lease_token is not null);
alter table billing.key_deletions
  add constraint key_deletions_lease_token_check check (status <> 'claimed' or lease_token is not null);
alter table billing.notifications
  add constraint notifications_lease_token_check check (lease_owner is null or lease_token is not null);

-- Invariant 9: one attempt per period in flight, whatever the code path.
create unique index charge_attempts_one_in_flight_per_period_key
  on billing.charge_attempts (period_id) where status in ('queued', 'claimed', 'unknown');

-- ---------------------------------------------------------------------------------------------
-- The billing-key envelope (service/crypto.py writes it):
--   byte 0      version, 1
--   byte 1      n = length of the key id in bytes (1–64)
--   bytes 2…    the key id (ASCII [A-Za-z0-9_.-]), equal to billing_key_key_id
--   next 12     AES-GCM nonce
--   the rest    AES-GCM ciphertext of the UTF-8 billing key followed by the 16-byte tag
--               (associated data: the payment method's customerKey)
-- ---------------------------------------------------------------------------------------------
create function billing.is_key_envelope(envelope bytea, key_id text)
returns boolean
language sql
immutable
parallel safe
set search_path = ''
as $$
  -- CASE, not AND: get_byte on a too-short value would raise instead of answering false.
  select case
    when envelope is null or key_id is null or key_id !~ '^[A-Za-z0-9_.-]{1,64}$' then false
    when pg_catalog.octet_length(envelope) < 2 + pg_catalog.length(key_id) + 12 + 16 + 1
         or pg_catalog.octet_length(envelope) > 4096 then false
    else pg_catalog.get_byte(envelope, 0) = 1
         and pg_catalog.get_byte(envelope, 1) = pg_catalog.length(key_id)
         and pg_catalog.substr(envelope, 3, pg_catalog.length(key_id))
             = pg_catalog.convert_to(key_id, 'UTF8')
  end
$$;
revoke execute on function billing.is_key_envelope(bytea, text) from public;
comment on function billing.is_key_envelope(bytea, text) is
  'True when a value is shaped like the service''s billing-key envelope v1 for that key id '
  '(version 1, key id, 12-byte nonce, ciphertext and 16-byte tag). It cannot prove the ciphertext '
  'is genuine, but refuses a plaintext key or a stray blob. Owner only (check constraint). Raises nothing.';

alter table billing.payment_methods
  add constraint payment_methods_billing_key_envelope_check
  check (billing.is_key_envelope(billing_key_ciphertext, billing_key_key_id));

-- ---------------------------------------------------------------------------------------------
-- One result shape for every service_record_* function
-- ---------------------------------------------------------------------------------------------
create type billing.recorded as (
  id text,          -- the row the result was recorded on (uuid or bigint, as text)
  status text,      -- its status afterwards (the SQL enum label)
  changed boolean,  -- false when the same result had already been recorded
  detail jsonb      -- what followed from it (next attempt, refund, sync of a payment, …)
);
comment on type billing.recorded is
  'The result of every billing.service_record_* function: the row, its status afterwards, whether '
  'anything changed, and a detail object.';

create function billing.recorded_of(id text, status text, changed boolean, detail jsonb default '{}')
returns billing.recorded
language sql
immutable
set search_path = ''
as $$
  select row(id, status, changed, coalesce(detail, '{}'::jsonb))::billing.recorded
$$;
revoke execute on function billing.recorded_of(text, text, boolean, jsonb) from public;
comment on function billing.recorded_of(text, text, boolean, jsonb) is
  'Builds a billing.recorded. Owner only. Raises nothing.';

-- Refuses a result from anyone but the holder of the latest claim of a row.
create function billing.check_lease_token(entity text, id text, current_token uuid, given_token uuid)
returns void
language plpgsql
set search_path = ''
as $$
begin
  if given_token is null then
    raise exception 'lease_token is required to record a result for % %', entity, id using errcode = 'SB400';
  end if;
  if current_token is distinct from given_token then
    raise exception '% %: lease % is not the current lease (the work was claimed again); result refused',
      entity, id, given_token using errcode = 'SB409';
  end if;
end
$$;
revoke execute on function billing.check_lease_token(text, text, uuid, uuid) from public;
comment on function billing.check_lease_token(text, text, uuid, uuid) is
  'Fencing: raises SB409 unless the given lease token is the row''s current one (SB400 when null). '
  'Owner only.';

-- ---------------------------------------------------------------------------------------------
-- May an attempt be sent (again)? Only while its period is the open current period of a live
-- subscription, on the subscription's current card, that card active, and nothing holding charges
-- back (a card awaited, a cancel waiting for an in-flight charge). Otherwise a possibly sent charge
-- is looked up instead, and one never sent is withdrawn.
-- ---------------------------------------------------------------------------------------------
create or replace function billing.resend_allowed(attempt_id uuid)
returns boolean
language sql
stable
set search_path = ''
as $$
  select exists (
    select 1
      from billing.charge_attempts ca
      join billing.billing_periods bp on bp.id = ca.period_id
      join billing.subscriptions su on su.id = ca.subscription_id
      join billing.payment_methods pm on pm.id = ca.payment_method_id
     where ca.id = resend_allowed.attempt_id
       and bp.status = 'open'
       and su.current_period_id = bp.id
       and su.status in ('incomplete', 'active', 'past_due')
       and su.payment_method_id = ca.payment_method_id
       and pm.status = 'active'
       and not su.awaiting_card
       and not su.cancel_at_period_end)
$$;
comment on function billing.resend_allowed(uuid) is
  'True when an attempt may be charged: its period is the open current period of a live '
  'subscription, it is on the subscription''s active card, no new card is awaited and no cancel is '
  'pending. Owner only. Raises nothing.';

-- A charge of the subscription may have reached Toss and is not resolved yet.
create function billing.charge_possibly_sent(subscription_id uuid)
returns boolean
language sql
stable
set search_path = ''
as $$
  select exists (select 1 from billing.charge_attempts ca
                  where ca.subscription_id = charge_possibly_sent.subscription_id
                    and (ca.status in ('claimed', 'unknown') or (ca.status = 'queued' and ca.sends > 0)))
$$;
revoke execute on function billing.charge_possibly_sent(uuid) from public;
comment on function billing.charge_possibly_sent(uuid) is
  'True while an attempt of the subscription is claimed, unknown, or queued for a re-send (it may '
  'have charged). Owner only. Raises nothing.';

-- A subscriber cancelled while a charge was in flight: once nothing is in flight and the current
-- period is still unpaid, the subscription ends now (an approval instead keeps it to the end of
-- the period it paid for, through cancel_at_period_end).
create function billing.settle_pending_cancel(subscription_id uuid)
returns boolean
language plpgsql
set search_path = ''
as $$
declare
  s billing.subscriptions;
begin
  select * into s from billing.subscriptions su where su.id = settle_pending_cancel.subscription_id;
  if not found or not s.cancel_at_period_end or s.status not in ('incomplete', 'active', 'past_due')
     or not exists (select 1 from billing.billing_periods bp where bp.id = s.current_period_id and bp.status = 'open')
     or billing.charge_possibly_sent(s.id) then
    return false;
  end if;
  perform billing.end_subscription(s.id, 'canceled', 'void', 'canceled by subscriber; the charge in flight did not pay');
  return true;
end
$$;
revoke execute on function billing.settle_pending_cancel(uuid) from public;
comment on function billing.settle_pending_cancel(uuid) is
  'Ends a subscription whose subscriber cancelled during a charge, once nothing is in flight and the '
  'period is unpaid; true when it ended it. Caller holds the subscription lock. Owner only. Raises nothing.';

-- ---------------------------------------------------------------------------------------------
-- After a failed charge: a new attempt after a processed temporary error, dunning after a decline,
-- a wait for a new card when the card is dead or gone, the end when a cancel was waiting
-- ---------------------------------------------------------------------------------------------
create or replace function billing.after_charge_failure(attempt_id uuid)
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
  v_class billing.failure_class;
  v_card_ok boolean;
  v_spent integer;
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
  v_class := a.classification;

  if s.status not in ('incomplete', 'active', 'past_due') or p.status <> 'open' or s.current_period_id <> p.id then
    return pg_catalog.jsonb_build_object('action', 'none', 'why', 'period not open on a live subscription');
  end if;
  if exists (select 1 from billing.charge_attempts ca
              where ca.period_id = p.id and ca.id <> a.id and ca.status in ('queued', 'claimed', 'unknown')) then
    return pg_catalog.jsonb_build_object('action', 'none', 'why', 'another attempt is in flight');
  end if;
  -- The subscriber cancelled while this charge was in flight; it did not pay, so it ends now.
  if billing.settle_pending_cancel(s.id) then
    return pg_catalog.jsonb_build_object('action', 'ended', 'status', 'canceled',
                                         'why', 'cancel requested during the charge');
  end if;

  v_card_ok := not s.awaiting_card
               and exists (select 1 from billing.payment_methods pm
                            where pm.id = s.payment_method_id and pm.status = 'active');

  -- Toss processed the request and failed for a passing reason; that key would only replay the
  -- error, so a new attempt (new orderId and key) follows after a backoff, at most three times a
  -- period. After that the failure counts as a decline and dunning takes over.
  if v_class in ('unprocessed', 'transient', 'reconcile') then
    select pg_catalog.count(*) into v_spent
      from billing.charge_attempts ca
     where ca.period_id = p.id and ca.status = 'failed'
       and ca.classification in ('unprocessed', 'transient', 'reconcile');
    if v_spent <= 3 and v_card_ok then
      v_next_at := v_now + billing.backoff(v_spent, interval '10 minutes', interval '2 hours');
      v_next := billing.create_attempt(p.id, v_next_at,
                                       'new attempt ' || v_spent || ' of 3 after ' || v_class || ' ' || a.error_code);
      return pg_catalog.jsonb_build_object('action', 'retry', 'attemptId', v_next.id, 'notBefore', v_next_at);
    end if;
    v_class := 'decline';
  end if;

  if s.status = 'active' then
    s := billing.mark_past_due(s.id, v_class || ': ' || a.error_code);
  end if;

  if v_class = 'bug' then
    perform billing.raise_alert('charge failed with a bug classification; no retry', 'charge_attempts', a.id,
      pg_catalog.jsonb_build_object('code', a.error_code, 'message', a.error_message, 'subscriptionId', s.id));
    return pg_catalog.jsonb_build_object('action', 'alert');
  end if;

  -- No automatic retries on a dead or deleted card, nor for a first charge: the subscriber must
  -- register a card that works.
  if v_class = 'needs_new_card' or s.status = 'incomplete' or not v_card_ok then
    if v_card_ok and s.payment_method_id <> a.payment_method_id then
      -- The card that failed was replaced while its charge was in flight (replace_card then adds
      -- no attempt): the new card is tried at once instead of being asked for again.
      v_next := billing.create_attempt(p.id, v_now, 'charged on the card registered during the last charge');
      return pg_catalog.jsonb_build_object('action', 'retry', 'attemptId', v_next.id, 'notBefore', v_now);
    end if;
    update billing.subscriptions su
       set awaiting_card = true, status_reason = v_class || ': ' || a.error_code
     where su.id = s.id and not su.awaiting_card;
    if found then
      perform billing.notify_subscriber(
        case when v_class = 'needs_new_card' then 'card_needed'::billing.notification_kind
             else 'payment_failed' end,
        s.id, pg_catalog.jsonb_build_object('code', a.error_code, 'message', a.error_message,
                                            'periodIndex', p.period_index, 'nextRetryAt', null,
                                            'graceEndsAt', s.grace_ends_at));
    end if;
    return pg_catalog.jsonb_build_object('action', 'await_card', 'graceEndsAt', s.grace_ends_at);
  end if;

  -- The k-th counted failure of the period is retried at past_due_since + schedule[k]; after the
  -- last step the subscription ends. Passing failures are free while they get new attempts (three);
  -- each one after that counts, or a passing error on a dunning retry would fall back to a step
  -- already due and retry at once, without end.
  select pg_catalog.count(*) filter (where ca.classification not in ('unprocessed', 'transient', 'reconcile'))
         + greatest(pg_catalog.count(*) filter (where ca.classification in ('unprocessed', 'transient', 'reconcile')) - 3, 0)
    into v_failures
    from billing.charge_attempts ca
   where ca.period_id = p.id and ca.status in ('declined', 'failed');
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
comment on function billing.after_charge_failure(uuid) is
  'After a declined or failed attempt: a new attempt after a processed temporary error (at most 3 a '
  'period), else past_due and the next attempt on the plan''s dunning schedule, a wait for a new '
  'card (dead or deleted card, first charge; unless the card was replaced meanwhile: then the new '
  'card at once), an alert (bug), the end of the subscription when the '
  'schedule is exhausted or a cancel was waiting for this charge. Caller holds the subscription lock. '
  'Owner only. Raises nothing of its own.';

-- ---------------------------------------------------------------------------------------------
-- Claims: every queue hands out a lease with a fresh fencing token
-- ---------------------------------------------------------------------------------------------
drop function billing.service_claim_attempts(text, integer, interval);
create function billing.service_claim_attempts(worker text, batch integer default 10,
                                               lease interval default interval '2 minutes')
returns table (attempt_id uuid, lease_token uuid, mode text, order_id text, idempotency_key uuid, amount bigint,
               order_name text, customer_key text, billing_key_ciphertext bytea, billing_key_key_id text,
               customer_email text, customer_name text, subscription_id uuid, period_id uuid,
               attempt_number integer, lease_expires_at timestamptz)
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_now timestamptz := billing.now();
begin
  perform billing.check_claim_args(worker, batch, lease);
  return query
  with picked as (
    -- The subscription is locked with its attempt (the documented lock order, without waiting):
    -- a subscriber's cancel holding it makes the claim pass the attempt by, and a cancel that
    -- comes after the claim sees the attempt in flight.
    select ca.id,
           case when ca.status = 'queued' and billing.resend_allowed(ca.id) then 'charge'::billing.attempt_mode
                else 'lookup' end as mode
      from billing.charge_attempts ca
      join billing.subscriptions su on su.id = ca.subscription_id
     where ca.status in ('queued', 'unknown') and ca.not_before <= v_now
     order by ca.not_before, ca.id
     limit batch
       for update of ca skip locked
       for no key update of su skip locked
  ), claimed as (
    update billing.charge_attempts ca
       set status = 'claimed',
           claim_mode = picked.mode,
           status_reason = picked.mode || ' by ' || worker,
           lease_owner = worker,
           lease_expires_at = v_now + lease,
           lease_token = pg_catalog.gen_random_uuid(),
           sends = ca.sends + (picked.mode = 'charge')::integer,
           lookups = ca.lookups + (picked.mode = 'lookup')::integer
      from picked
     where ca.id = picked.id
    returning ca.*
  )
  select c.id, c.lease_token, c.claim_mode::text, c.order_id, c.idempotency_key, c.amount, c.order_name,
         pm.customer_key, pm.billing_key_ciphertext, pm.billing_key_key_id, cu.email, cu.name, c.subscription_id,
         c.period_id, c.attempt_number, c.lease_expires_at
    from claimed c
    join billing.payment_methods pm on pm.id = c.payment_method_id
    join billing.customers cu on cu.id = pm.customer_id
   order by c.not_before, c.id;
end
$$;
revoke execute on function billing.service_claim_attempts(text, integer, interval) from public;
grant execute on function billing.service_claim_attempts(text, integer, interval) to billing_service;
comment on function billing.service_claim_attempts(text, integer, interval) is
  'Service: claims up to batch due attempts under a lease with a fresh lease_token (pass it to every '
  'service_record_charge_*). mode ''charge'': POST /v1/billing/{billingKey} with this orderId and '
  'Idempotency-Key; ''lookup'': GET /v1/payments/orders/{orderId} (an unknown outcome, a spent key, or a '
  'charge that may no longer go out). Attempts whose subscription is locked (a cancel in progress) '
  'wait for the next claim. billing_service only. Raises SB400 (worker 1–200 chars, batch 1–100, '
  'lease 10 s–1 h).';

drop function billing.service_claim_refunds(text, integer, interval);
create function billing.service_claim_refunds(worker text, batch integer default 10,
                                              lease interval default interval '2 minutes')
returns table (refund_id uuid, lease_token uuid, idempotency_key uuid, payment_key text, cancel_amount bigint,
               cancel_reason text, balance_amount bigint, lease_expires_at timestamptz)
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_now timestamptz := billing.now();
begin
  perform billing.check_claim_args(worker, batch, lease);
  return query
  with picked as (
    select r.id
      from billing.refunds r
     where r.status = 'requested' and r.not_before <= v_now
     order by r.not_before, r.id
     limit batch
       for update skip locked
  ), claimed as (
    update billing.refunds r
       set status = 'claimed', status_reason = 'claimed by ' || worker, lease_owner = worker,
           lease_expires_at = v_now + lease, lease_token = pg_catalog.gen_random_uuid(), attempts = r.attempts + 1
      from picked
     where r.id = picked.id
    returning r.*
  )
  select c.id, c.lease_token, c.id, p.payment_key, c.amount, c.reason, p.balance_amount, c.lease_expires_at
    from claimed c
    join billing.payments p on p.id = c.payment_id
   order by c.not_before, c.id;
end
$$;
revoke execute on function billing.service_claim_refunds(text, integer, interval) from public;
grant execute on function billing.service_claim_refunds(text, integer, interval) to billing_service;
comment on function billing.service_claim_refunds(text, integer, interval) is
  'Service: claims up to batch requested refunds under a lease with a fresh lease_token; call POST '
  '/v1/payments/{paymentKey}/cancel with Idempotency-Key = idempotency_key (the refund id) and '
  'cancelAmount. billing_service only. Raises SB400 (bad worker/batch/lease).';

drop function billing.service_claim_webhooks(text, integer, interval);
create function billing.service_claim_webhooks(worker text, batch integer default 10,
                                               lease interval default interval '2 minutes')
returns table (webhook_event_id uuid, lease_token uuid, transmission_id text, event_type text, payload jsonb,
               headers jsonb, attempts integer, lease_expires_at timestamptz)
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_now timestamptz := billing.now();
begin
  perform billing.check_claim_args(worker, batch, lease);
  return query
  with picked as (
    select we.id
      from billing.webhook_events we
     where we.status = 'received' and we.not_before <= v_now
     order by we.not_before, we.id
     limit batch
       for update skip locked
  )
  update billing.webhook_events we
     set status = 'processing', status_reason = 'claimed by ' || worker, lease_owner = worker,
         lease_expires_at = v_now + lease, lease_token = pg_catalog.gen_random_uuid(), attempts = we.attempts + 1
    from picked
   where we.id = picked.id
  returning we.id, we.lease_token, we.transmission_id, we.event_type, we.payload, we.headers, we.attempts,
            we.lease_expires_at;
end
$$;
revoke execute on function billing.service_claim_webhooks(text, integer, interval) from public;
grant execute on function billing.service_claim_webhooks(text, integer, interval) to billing_service;
comment on function billing.service_claim_webhooks(text, integer, interval) is
  'Service: claims up to batch stored webhooks under a lease with a fresh lease_token. '
  'PAYMENT_STATUS_CHANGED: re-fetch the payment (GET /v1/payments/{paymentKey}) and call '
  'service_apply_payment_snapshot; DEPOSIT_CALLBACK (secret already matched): re-fetch by orderId '
  'and do the same; BILLING_DELETED: service_mark_payment_method_deleted. Finish each with '
  'service_record_webhook_result. billing_service only. Raises SB400.';

drop function billing.service_claim_key_deletions(text, integer, interval);
create function billing.service_claim_key_deletions(worker text, batch integer default 10,
                                                    lease interval default interval '2 minutes')
returns table (key_deletion_id uuid, lease_token uuid, payment_method_id uuid, customer_key text,
               billing_key_ciphertext bytea, billing_key_key_id text, lease_expires_at timestamptz)
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_now timestamptz := billing.now();
begin
  perform billing.check_claim_args(worker, batch, lease);
  return query
  with picked as (
    select kd.id
      from billing.key_deletions kd
     where kd.status = 'requested' and kd.not_before <= v_now
       -- A key is deleted only after every charge sent on it is resolved.
       and not exists (select 1 from billing.charge_attempts ca
                        where ca.payment_method_id = kd.payment_method_id
                          and ca.status in ('queued', 'claimed', 'unknown'))
     order by kd.not_before, kd.id
     limit batch
       for update of kd skip locked
  ), claimed as (
    update billing.key_deletions kd
       set status = 'claimed', status_reason = 'claimed by ' || worker, lease_owner = worker,
           lease_expires_at = v_now + lease, lease_token = pg_catalog.gen_random_uuid(), attempts = kd.attempts + 1
      from picked
     where kd.id = picked.id
    returning kd.*
  )
  select c.id, c.lease_token, c.payment_method_id, pm.customer_key, pm.billing_key_ciphertext,
         pm.billing_key_key_id, c.lease_expires_at
    from claimed c
    join billing.payment_methods pm on pm.id = c.payment_method_id
   order by c.not_before, c.id;
end
$$;
revoke execute on function billing.service_claim_key_deletions(text, integer, interval) from public;
grant execute on function billing.service_claim_key_deletions(text, integer, interval) to billing_service;
comment on function billing.service_claim_key_deletions(text, integer, interval) is
  'Service: claims up to batch billing keys to delete at Toss (DELETE /v1/billing/{billingKey}) under '
  'a lease with a fresh lease_token, skipping keys with charges still in flight. billing_service '
  'only. Raises SB400.';

drop function billing.service_claim_notifications(text, integer, interval);
create function billing.service_claim_notifications(worker text, batch integer default 10,
                                                    lease interval default interval '2 minutes')
returns table (notification_id bigint, lease_token uuid, kind text, user_id text, customer_email text,
               customer_name text, subscription_id uuid, payload jsonb, created_at timestamptz,
               lease_expires_at timestamptz)
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_now timestamptz := billing.now();
begin
  perform billing.check_claim_args(worker, batch, lease);
  return query
  with picked as (
    select n.id
      from billing.notifications n
     where n.delivered_at is null and (n.lease_expires_at is null or n.lease_expires_at <= v_now)
     order by n.id
     limit batch
       for update skip locked
  ), claimed as (
    update billing.notifications n
       set lease_owner = worker, lease_expires_at = v_now + lease, lease_token = pg_catalog.gen_random_uuid(),
           attempts = n.attempts + 1
      from picked
     where n.id = picked.id
    returning n.*
  )
  select c.id, c.lease_token, c.kind::text, c.user_id, cu.email, cu.name, c.subscription_id, c.payload,
         c.created_at, c.lease_expires_at
    from claimed c
    left join billing.customers cu on cu.id = c.customer_id
   order by c.id;
end
$$;
revoke execute on function billing.service_claim_notifications(text, integer, interval) from public;
grant execute on function billing.service_claim_notifications(text, integer, interval) to billing_service;
comment on function billing.service_claim_notifications(text, integer, interval) is
  'Service: claims up to batch undelivered notifications (oldest first) under a lease with a fresh '
  'lease_token; an expired lease makes one claimable again. billing_service only. Raises SB400.';

-- ---------------------------------------------------------------------------------------------
-- Recording charge results
-- ---------------------------------------------------------------------------------------------
create function billing.attempt_recorded(a billing.charge_attempts, changed boolean, detail jsonb default '{}')
returns billing.recorded
language sql
immutable
set search_path = ''
as $$
  select billing.recorded_of(a.id::text, a.status::text, changed,
                             pg_catalog.jsonb_build_object('notBefore', a.not_before, 'orderId', a.order_id,
                                                           'classification', a.classification)
                             || coalesce(detail, '{}'::jsonb))
$$;
revoke execute on function billing.attempt_recorded(billing.charge_attempts, boolean, jsonb) from public;
comment on function billing.attempt_recorded(billing.charge_attempts, boolean, jsonb) is
  'The billing.recorded of a charge attempt (detail: notBefore, orderId, classification, extra). '
  'Owner only. Raises nothing.';

drop function billing.attempt_result(billing.charge_attempts, boolean, jsonb);

-- Locks an attempt the way every recording does (subscription, then attempt) and checks the fence.
create function billing.lock_leased_attempt(attempt_id uuid, lease_token uuid)
returns billing.charge_attempts
language plpgsql
set search_path = ''
as $$
declare
  a billing.charge_attempts;
begin
  a := billing.lock_attempt(attempt_id);
  perform billing.check_lease_token('charge attempt', a.id::text, a.lease_token, lease_token);
  return a;
end
$$;
revoke execute on function billing.lock_leased_attempt(uuid, uuid) from public;
comment on function billing.lock_leased_attempt(uuid, uuid) is
  'Locks an attempt (subscription first) and refuses a lease token that is not its current one. '
  'Owner only. Raises SB400, SB404, SB409 (stale lease).';

drop function billing.service_record_charge_success(uuid, jsonb);
create function billing.service_record_charge_success(attempt_id uuid, lease_token uuid, payment jsonb)
returns billing.recorded
language plpgsql
security definer
set search_path = ''
as $$
declare
  v jsonb;
begin
  if attempt_id is null then
    raise exception 'attempt_id is required' using errcode = 'SB400';
  end if;
  -- An approval is a fact about money: recorded whoever reports it, current lease or not.
  v := billing.apply_charge_success(attempt_id, payment);
  return billing.recorded_of(attempt_id::text, v ->> 'attemptStatus', not (v ->> 'replay')::boolean,
                             v - 'attemptId' - 'attemptStatus' - 'replay');
end
$$;
revoke execute on function billing.service_record_charge_success(uuid, uuid, jsonb) from public;
grant execute on function billing.service_record_charge_success(uuid, uuid, jsonb) to billing_service;
comment on function billing.service_record_charge_success(uuid, uuid, jsonb) is
  'Service: records Toss''s approved Payment for an attempt (from any worker: an approval is never '
  'refused for a stale lease): stores the payment, marks the period paid, activates the subscription, '
  'grants the period''s credits and queues ''renewed'' (or ''activated''). Recording it again applies '
  'nothing twice (changed = false). An approval for a period already paid by another attempt (or after '
  'the subscription ended) is stored unapplied, the attempt marked duplicate, and a full refund is '
  'requested automatically with an operator alert; so is an approval for another amount than the '
  'attempt''s, which also fails the attempt as a bug (AMOUNT_MISMATCH). Detail: paymentId, applied, '
  'refundId, wrongAmount, next, sync. billing_service only. Raises SB400 (malformed, other order, '
  'not approved), SB404 (unknown attempt), SB409 (a different payment already recorded).';

drop function billing.service_record_charge_failure(uuid, text, text, text);
create function billing.service_record_charge_failure(attempt_id uuid, lease_token uuid, code text, message text,
                                                      classification text)
returns billing.recorded
language plpgsql
security definer
set search_path = ''
as $$
declare
  a billing.charge_attempts;
  v_class billing.failure_class;
  v_now timestamptz := billing.now();
  v_target billing.attempt_status;
begin
  if classification is null
     or classification not in (select pg_catalog.unnest(pg_catalog.enum_range(null::billing.failure_class))::text) then
    raise exception 'classification must be one of %, got %',
      pg_catalog.enum_range(null::billing.failure_class), classification using errcode = 'SB400';
  end if;
  v_class := classification::billing.failure_class;
  perform billing.check_error_args(code, message);
  a := billing.lock_leased_attempt(attempt_id, lease_token);

  if a.status <> 'claimed' then
    -- The holder of the lease repeating its result after a lost reply.
    if a.error_code is not distinct from code
       and (a.classification is not distinct from v_class or v_class = 'unprocessed') then
      return billing.attempt_recorded(a, false);
    end if;
    raise exception 'attempt % is %, not claimed; cannot record % %', a.id, a.status, v_class, code
      using errcode = 'SB409';
  end if;

  if v_class = 'unprocessed' then
    -- Toss did not process the request: the very same request (orderId and key) goes again after
    -- a backoff, a dozen times at most; then it is looked up like any unknown outcome.
    if a.claim_mode = 'charge' and a.transient_failures < 12 and billing.resend_allowed(a.id) then
      update billing.charge_attempts ca
         set status = 'queued', status_reason = 'unprocessed: ' || code || '; re-send with the same key',
             claim_mode = null, lease_owner = null, lease_expires_at = null,
             transient_failures = ca.transient_failures + 1,
             not_before = v_now + billing.backoff(ca.transient_failures + 1, interval '1 minute', interval '1 hour'),
             error_code = code, error_message = message
       where ca.id = a.id and ca.status = 'claimed'
      returning * into a;
    else
      update billing.charge_attempts ca
         set status = 'unknown', status_reason = 'unprocessed during ' || ca.claim_mode || ': ' || code,
             claim_mode = null, lease_owner = null, lease_expires_at = null,
             transient_failures = ca.transient_failures + 1,
             not_before = v_now + billing.backoff(ca.lookups + 1, interval '1 minute', interval '1 hour'),
             error_code = code, error_message = message
       where ca.id = a.id and ca.status = 'claimed'
      returning * into a;
    end if;
    return billing.attempt_recorded(a, true);
  end if;

  if v_class in ('transient', 'reconcile') and a.claim_mode = 'charge' then
    -- Processed: the key now replays this error. Whether anything was charged is settled by a
    -- lookup of the order before any new attempt.
    update billing.charge_attempts ca
       set status = 'unknown', status_reason = v_class || ': ' || code || '; look the order up',
           classification = v_class, claim_mode = null, lease_owner = null, lease_expires_at = null,
           transient_failures = ca.transient_failures + 1, not_before = v_now,
           error_code = code, error_message = message
     where ca.id = a.id and ca.status = 'claimed'
    returning * into a;
    return billing.attempt_recorded(a, true, pg_catalog.jsonb_build_object('next',
             pg_catalog.jsonb_build_object('action', 'lookup')));
  end if;

  -- A final answer for this attempt: a decline, a dead card, a bug, or (found by a lookup) a
  -- processed failure that charged nothing.
  v_target := case when v_class in ('decline', 'needs_new_card') then 'declined'::billing.attempt_status
                   else 'failed' end;
  update billing.charge_attempts ca
     set status = v_target, status_reason = v_class || ': ' || code, classification = v_class,
         error_code = code, error_message = message, claim_mode = null, lease_owner = null,
         lease_expires_at = null, resolved_at = v_now
   where ca.id = a.id and ca.status = 'claimed'
  returning * into a;
  return billing.attempt_recorded(a, true,
           pg_catalog.jsonb_build_object('next', billing.after_charge_failure(a.id)));
end
$$;
revoke execute on function billing.service_record_charge_failure(uuid, uuid, text, text, text) from public;
grant execute on function billing.service_record_charge_failure(uuid, uuid, text, text, text) to billing_service;
comment on function billing.service_record_charge_failure(uuid, uuid, text, text, text) is
  'Service: records a failed charge (or a failed payment found by a lookup) with toss.classify''s '
  'class of Toss''s code, from the holder of the lease. unprocessed (409 IDEMPOTENT_REQUEST_PROCESSING, '
  '429): the same request again after a backoff (then a lookup); transient / reconcile from a charge: '
  'unknown, looked up at once (the key is spent); from a lookup: failed, and a new attempt after a '
  'backoff (3 a period, then dunning); decline: declined, past_due, dunning; needs_new_card: declined, '
  'awaiting a card; bug: failed, operator alert. Repeating the result changes nothing. Detail: '
  'notBefore, orderId, classification, next. billing_service only. Raises SB400 (bad input), SB404 '
  '(unknown attempt), SB409 (stale lease, or already resolved otherwise).';

drop function billing.service_record_charge_unknown(uuid, text);
create function billing.service_record_charge_unknown(attempt_id uuid, lease_token uuid, detail text)
returns billing.recorded
language plpgsql
security definer
set search_path = ''
as $$
declare
  a billing.charge_attempts;
  v_now timestamptz := billing.now();
begin
  if pg_catalog.length(detail) > 510 then
    raise exception 'detail must be at most 510 characters' using errcode = 'SB400';
  end if;
  a := billing.lock_leased_attempt(attempt_id, lease_token);
  if a.status = 'unknown' then
    return billing.attempt_recorded(a, false);
  end if;
  update billing.charge_attempts ca
     set status = 'unknown', status_reason = 'outcome unknown: ' || coalesce(detail, 'no detail'),
         claim_mode = null, lease_owner = null, lease_expires_at = null, error_message = detail,
         not_before = v_now + billing.backoff(ca.lookups + 1, interval '1 minute', interval '1 hour')
   where ca.id = a.id and ca.status = 'claimed'
  returning * into a;
  if not found then
    raise exception 'attempt % is not claimed; its outcome is known', attempt_id using errcode = 'SB409';
  end if;
  return billing.attempt_recorded(a, true);
end
$$;
revoke execute on function billing.service_record_charge_unknown(uuid, uuid, text) from public;
grant execute on function billing.service_record_charge_unknown(uuid, uuid, text) to billing_service;
comment on function billing.service_record_charge_unknown(uuid, uuid, text) is
  'Service: the charge or the lookup got no readable answer (timeout, transport error, unreadable '
  'reply): the attempt becomes unknown and is handed out for a lookup after a backoff — never '
  're-charged under a new orderId. billing_service only. Raises SB400 (detail > 510), SB404 (unknown '
  'attempt), SB409 (stale lease, or not claimed).';

drop function billing.service_record_lookup_not_found(uuid);
create function billing.service_record_lookup_not_found(attempt_id uuid, lease_token uuid)
returns billing.recorded
language plpgsql
security definer
set search_path = ''
as $$
declare
  a billing.charge_attempts;
  v_now timestamptz := billing.now();
  v_ended boolean;
  v_next billing.charge_attempts;
begin
  a := billing.lock_leased_attempt(attempt_id, lease_token);
  if a.status <> 'claimed' or a.claim_mode <> 'lookup' then
    if a.status in ('queued', 'canceled', 'failed') and a.claim_mode is null then
      return billing.attempt_recorded(a, false);
    end if;
    raise exception 'attempt % is % (%); only a lookup can find nothing', a.id, a.status, a.claim_mode
      using errcode = 'SB409';
  end if;

  if a.classification is not null or a.transient_failures >= 12 then
    -- Nothing was charged, but this attempt's key replays an error (or Toss kept refusing it):
    -- the attempt is over, and a new one (new orderId and key) may follow.
    update billing.charge_attempts ca
       set status = 'failed', classification = coalesce(ca.classification, 'unprocessed'),
           status_reason = 'not found at Toss after ' || coalesce(ca.error_code, 'no answer'),
           claim_mode = null, lease_owner = null, lease_expires_at = null, resolved_at = v_now
     where ca.id = a.id
    returning * into a;
    return billing.attempt_recorded(a, true,
             pg_catalog.jsonb_build_object('next', billing.after_charge_failure(a.id)));
  end if;
  if billing.resend_allowed(a.id) then
    -- Toss has no such order: nothing was charged, so the very same request can be sent again.
    update billing.charge_attempts ca
       set status = 'queued', status_reason = 'not found at Toss; re-send', claim_mode = null, lease_owner = null,
           lease_expires_at = null, not_before = v_now
     where ca.id = a.id
    returning * into a;
    return billing.attempt_recorded(a, true);
  end if;
  update billing.charge_attempts ca
     set status = 'canceled', status_reason = 'not found at Toss; no longer to be charged', claim_mode = null,
         lease_owner = null, lease_expires_at = null, resolved_at = v_now
   where ca.id = a.id
  returning * into a;
  v_ended := billing.settle_pending_cancel(a.subscription_id);
  -- A card registered while this charge was in flight got no attempt of its own (replace_card
  -- leaves a period with one in flight alone): the unpaid period is charged on it now, or it would
  -- wait for nothing.
  if not v_ended
     and exists (select 1 from billing.subscriptions su
                   join billing.billing_periods bp on bp.id = su.current_period_id
                   join billing.payment_methods pm on pm.id = su.payment_method_id
                  where su.id = a.subscription_id and bp.id = a.period_id and bp.status = 'open'
                    and su.status in ('incomplete', 'active', 'past_due') and pm.status = 'active'
                    and su.payment_method_id <> a.payment_method_id
                    and not su.awaiting_card and not su.cancel_at_period_end)
     and not exists (select 1 from billing.charge_attempts ca
                      where ca.period_id = a.period_id and ca.status in ('queued', 'claimed', 'unknown')) then
    v_next := billing.create_attempt(a.period_id, v_now, 'charged on the card registered during the last charge');
  end if;
  return billing.attempt_recorded(a, true,
           pg_catalog.jsonb_build_object('ended', v_ended)
           || case when v_next.id is null then '{}'::jsonb
                   else pg_catalog.jsonb_build_object('next', pg_catalog.jsonb_build_object(
                          'action', 'retry', 'attemptId', v_next.id, 'notBefore', v_next.not_before)) end);
end
$$;
revoke execute on function billing.service_record_lookup_not_found(uuid, uuid) from public;
grant execute on function billing.service_record_lookup_not_found(uuid, uuid) to billing_service;
comment on function billing.service_record_lookup_not_found(uuid, uuid) is
  'Service: GET /v1/payments/orders/{orderId} answered NOT_FOUND_PAYMENT for a claimed lookup, so '
  'nothing was charged: a never-answered request is queued again (same orderId and key); one whose key '
  'replays a processed error fails and a new attempt may follow; one no longer to be charged is '
  'canceled (ending a subscription whose cancel waited for it, or charging the period at once on a card '
  'registered meanwhile; detail next). Repeating it changes nothing. billing_service only. Raises '
  'SB400, SB404 (unknown attempt), SB409 (stale lease, not a lookup).';

-- ---------------------------------------------------------------------------------------------
-- Recording refunds, webhooks, key deletions, notifications
-- ---------------------------------------------------------------------------------------------
drop function billing.service_record_refund_result(uuid, jsonb, text, text, boolean);
create function billing.service_record_refund_result(refund_id uuid, lease_token uuid, payment jsonb default null,
                                                     error_code text default null, error_message text default null,
                                                     classification text default null)
returns billing.recorded
language plpgsql
security definer
set search_path = ''
as $$
declare
  r billing.refunds;
  pay billing.payments;
  v record;
  c jsonb;
  v_sync jsonb;
  v_now timestamptz := billing.now();
begin
  if refund_id is null then
    raise exception 'refund_id is required' using errcode = 'SB400';
  end if;
  if (payment is null) = (error_code is null) then
    raise exception 'give either the Payment returned by the cancel or an error code' using errcode = 'SB400';
  end if;
  if pg_catalog.length(error_code) > 100 or pg_catalog.length(error_message) > 510 then
    raise exception 'error_code (≤ 100) or error_message (≤ 510) too long' using errcode = 'SB400';
  end if;
  if error_code is not null and (classification is null or classification not in
       (select pg_catalog.unnest(pg_catalog.enum_range(null::billing.failure_class))::text)) then
    raise exception 'classification must be one of %, got %',
      pg_catalog.enum_range(null::billing.failure_class), classification using errcode = 'SB400';
  end if;
  select * into r from billing.refunds x where x.id = service_record_refund_result.refund_id;
  if not found then
    raise exception 'refund % not found', refund_id using errcode = 'SB404';
  end if;
  select * into strict pay from billing.payments p where p.id = r.payment_id for update;
  select * into strict r from billing.refunds x where x.id = r.id for update;

  if payment is not null then
    -- A refund Toss made is a fact about money: recorded whoever reports it.
    select * into v from billing.parse_payment(payment);
    if v.payment_key <> pay.payment_key then
      raise exception 'refund % is for payment %, not %', r.id, pay.payment_key, v.payment_key using errcode = 'SB400';
    end if;
    if r.status = 'succeeded' then
      v_sync := billing.sync_payment(pay.id, payment);
      return billing.recorded_of(r.id::text, r.status::text, false, pg_catalog.jsonb_build_object('sync', v_sync));
    end if;
    -- Our cancel is the response's last transaction; else the newest unrecorded one of our amount.
    select e into c
      from pg_catalog.jsonb_array_elements(billing.payment_cancels(payment)) with ordinality as x(e, n)
     where coalesce(e ->> 'cancelStatus', 'DONE') = 'DONE'
       and (e ->> 'cancelAmount')::numeric = r.amount
       and e ->> 'transactionKey' is not null
       and not exists (select 1 from billing.refunds o where o.toss_transaction_key = e ->> 'transactionKey')
     order by (e ->> 'transactionKey' = payment ->> 'lastTransactionKey') desc, x.n desc
     limit 1;
    if c is null then
      raise exception 'payment % shows no cancel of % KRW for refund %', pay.payment_key, r.amount, r.id
        using errcode = 'SB422';
    end if;
    update billing.refunds x
       set status = 'succeeded', status_reason = 'canceled at Toss as ' || (c ->> 'transactionKey'),
           toss_transaction_key = c ->> 'transactionKey', canceled_at = (c ->> 'canceledAt')::timestamptz,
           lease_owner = null, lease_expires_at = null, error_code = null, error_message = null
     where x.id = r.id
    returning * into r;
    v_sync := billing.sync_payment(pay.id, payment);
    return billing.recorded_of(r.id::text, r.status::text, true, pg_catalog.jsonb_build_object('sync', v_sync));
  end if;

  perform billing.check_lease_token('refund', r.id::text, r.lease_token, lease_token);
  if r.status <> 'claimed' then
    if r.error_code is not distinct from error_code and r.status in ('requested', 'failed') then
      return billing.recorded_of(r.id::text, r.status::text, false);
    end if;
    raise exception 'refund % is %, not claimed; cannot record error %', r.id, r.status, error_code
      using errcode = 'SB409';
  end if;
  if classification = 'unprocessed' and r.attempts < 10 then
    -- Not processed by Toss: the same cancel (same Idempotency-Key) again after a backoff.
    update billing.refunds x
       set status = 'requested', status_reason = 'retry after ' || service_record_refund_result.error_code,
           lease_owner = null, lease_expires_at = null,
           not_before = v_now + billing.backoff(x.attempts, interval '1 minute', interval '1 hour'),
           error_code = service_record_refund_result.error_code,
           error_message = service_record_refund_result.error_message
     where x.id = r.id
    returning * into r;
  else
    -- A processed error is replayed under this key for 15 days: the refund fails and an operator
    -- decides (a new refund request is a new key).
    update billing.refunds x
       set status = 'failed', status_reason = 'failed: ' || service_record_refund_result.error_code,
           lease_owner = null, lease_expires_at = null,
           error_code = service_record_refund_result.error_code,
           error_message = service_record_refund_result.error_message
     where x.id = r.id
    returning * into r;
    perform billing.raise_alert('refund failed', 'refunds', r.id,
      pg_catalog.jsonb_build_object('code', r.error_code, 'message', r.error_message, 'amount', r.amount,
                                    'classification', classification));
  end if;
  return billing.recorded_of(r.id::text, r.status::text, true);
end
$$;
revoke execute on function billing.service_record_refund_result(uuid, uuid, jsonb, text, text, text) from public;
grant execute on function billing.service_record_refund_result(uuid, uuid, jsonb, text, text, text) to billing_service;
comment on function billing.service_record_refund_result(uuid, uuid, jsonb, text, text, text) is
  'Service: records the outcome of a cancel call: the Payment it returned (from anyone: the refund '
  'takes its cancel from cancels[], the snapshot is applied, credits are revoked when balanceAmount '
  'reaches 0), or, from the holder of the lease, an error with toss.classify''s class: unprocessed is '
  'requested again with backoff under the same Idempotency-Key (10 tries); anything else fails with an '
  'operator alert. Idempotent. Detail: sync. billing_service only. Raises SB400 (bad input, other '
  'payment), SB404 (unknown refund), SB409 (stale lease, already resolved otherwise), SB422 (the '
  'payment shows no matching cancel).';

drop function billing.service_record_webhook_result(uuid, text, text);
create function billing.service_record_webhook_result(webhook_event_id uuid, lease_token uuid, outcome text,
                                                      error text default null)
returns billing.recorded
language plpgsql
security definer
set search_path = ''
as $$
declare
  w billing.webhook_events;
  v_now timestamptz := billing.now();
begin
  if outcome is null or outcome not in ('processed', 'ignored', 'retry', 'failed') then
    raise exception 'outcome must be processed, ignored, retry or failed, got %', outcome using errcode = 'SB400';
  end if;
  if pg_catalog.length(error) > 2000 then
    raise exception 'error must be at most 2000 characters' using errcode = 'SB400';
  end if;
  select * into w from billing.webhook_events we where we.id = service_record_webhook_result.webhook_event_id for update;
  if not found then
    raise exception 'webhook event % not found', webhook_event_id using errcode = 'SB404';
  end if;
  perform billing.check_lease_token('webhook event', w.id::text, w.lease_token, lease_token);
  if w.status::text = outcome or (outcome = 'retry' and w.status = 'received') then
    return billing.recorded_of(w.id::text, w.status::text, false);
  end if;
  if w.status <> 'processing' then
    raise exception 'webhook event % is %, not processing; cannot record %', w.id, w.status, outcome
      using errcode = 'SB409';
  end if;
  if outcome = 'retry' and w.attempts < 10 then
    update billing.webhook_events we
       set status = 'received', status_reason = 'retry: ' || coalesce(error, 'no detail'), last_error = error,
           lease_owner = null, lease_expires_at = null,
           not_before = v_now + billing.backoff(we.attempts, interval '1 minute', interval '1 hour')
     where we.id = w.id
    returning * into w;
  else
    update billing.webhook_events we
       set status = case when outcome = 'retry' then 'failed'::billing.webhook_status else outcome::billing.webhook_status end,
           status_reason = coalesce(outcome || ': ' || error, outcome), last_error = coalesce(error, we.last_error),
           lease_owner = null, lease_expires_at = null, processed_at = v_now
     where we.id = w.id
    returning * into w;
    if w.status = 'failed' then
      perform billing.raise_alert('webhook processing failed', 'webhook_events', w.id,
        pg_catalog.jsonb_build_object('eventType', w.event_type, 'error', w.last_error, 'attempts', w.attempts));
    end if;
  end if;
  return billing.recorded_of(w.id::text, w.status::text, true);
end
$$;
revoke execute on function billing.service_record_webhook_result(uuid, uuid, text, text) from public;
grant execute on function billing.service_record_webhook_result(uuid, uuid, text, text) to billing_service;
comment on function billing.service_record_webhook_result(uuid, uuid, text, text) is
  'Service: finishes a claimed webhook, from the holder of the lease: processed, ignored, failed '
  '(operator alert) or retry (received again after a backoff; failed after 10 tries). Repeating a '
  'result changes nothing. billing_service only. Raises SB400 (bad outcome, no token), SB404 (unknown '
  'event), SB409 (stale lease, not processing).';

drop function billing.service_record_key_deleted(uuid, text, text);
create function billing.service_record_key_deleted(key_deletion_id uuid, lease_token uuid,
                                                   error_code text default null, error_message text default null)
returns billing.recorded
language plpgsql
security definer
set search_path = ''
as $$
declare
  kd billing.key_deletions;
  v_now timestamptz := billing.now();
begin
  if pg_catalog.length(error_code) > 100 or pg_catalog.length(error_message) > 510 then
    raise exception 'error_code (≤ 100) or error_message (≤ 510) too long' using errcode = 'SB400';
  end if;
  select * into kd from billing.key_deletions x where x.id = service_record_key_deleted.key_deletion_id for update;
  if not found then
    raise exception 'key deletion % not found', key_deletion_id using errcode = 'SB404';
  end if;
  if error_code is null then
    -- A key Toss deleted is gone whoever reports it.
    if kd.status = 'deleted' then
      return billing.recorded_of(kd.id::text, kd.status::text, false);
    end if;
    update billing.key_deletions x
       set status = 'deleted', status_reason = 'deleted at Toss', deleted_at = v_now, lease_owner = null,
           lease_expires_at = null
     where x.id = kd.id
    returning * into kd;
    update billing.payment_methods pm
       set status = 'deleted', status_reason = 'billing key deleted at Toss', deleted_at = v_now
     where pm.id = kd.payment_method_id and pm.status <> 'deleted';
    return billing.recorded_of(kd.id::text, kd.status::text, true);
  end if;
  perform billing.check_lease_token('key deletion', kd.id::text, kd.lease_token, lease_token);
  if kd.status <> 'claimed' then
    if kd.status in ('requested', 'failed') and kd.error_code is not distinct from error_code then
      return billing.recorded_of(kd.id::text, kd.status::text, false);
    end if;
    raise exception 'key deletion % is %, not claimed; cannot record error %', kd.id, kd.status, error_code
      using errcode = 'SB409';
  end if;
  update billing.key_deletions x
     set status = case when x.attempts < 8 then 'requested'::billing.key_deletion_status else 'failed' end,
         status_reason = 'error: ' || service_record_key_deleted.error_code,
         not_before = v_now + billing.backoff(x.attempts, interval '5 minutes', interval '6 hours'),
         lease_owner = null, lease_expires_at = null,
         error_code = service_record_key_deleted.error_code, error_message = service_record_key_deleted.error_message
   where x.id = kd.id
  returning * into kd;
  if kd.status = 'failed' then
    perform billing.raise_alert('billing key deletion failed', 'key_deletions', kd.id,
      pg_catalog.jsonb_build_object('code', kd.error_code, 'message', kd.error_message));
  end if;
  return billing.recorded_of(kd.id::text, kd.status::text, true);
end
$$;
revoke execute on function billing.service_record_key_deleted(uuid, uuid, text, text) from public;
grant execute on function billing.service_record_key_deleted(uuid, uuid, text, text) to billing_service;
comment on function billing.service_record_key_deleted(uuid, uuid, text, text) is
  'Service: records the DELETE of a billing key at Toss: without error_code it is deleted (from anyone; '
  'map already-gone codes such as NOT_FOUND_BILLING to success); with one, from the holder of the '
  'lease, it is retried with backoff, failed after 8 tries with an operator alert. Idempotent. '
  'billing_service only. Raises SB400, SB404 (unknown deletion), SB409 (stale lease, not claimed).';

drop function billing.service_record_notification_delivered(bigint);
create function billing.service_record_notification_delivered(notification_id bigint, lease_token uuid)
returns billing.recorded
language plpgsql
security definer
set search_path = ''
as $$
declare
  n billing.notifications;
begin
  select * into n from billing.notifications x
   where x.id = service_record_notification_delivered.notification_id for update;
  if not found then
    raise exception 'notification % not found', notification_id using errcode = 'SB404';
  end if;
  if lease_token is null then
    raise exception 'lease_token is required' using errcode = 'SB400';
  end if;
  -- Delivered is a fact (the receiver has it), recorded whoever reports it: that stops a re-send.
  if n.delivered_at is not null then
    return billing.recorded_of(n.id::text, 'delivered', false);
  end if;
  update billing.notifications x
     set delivered_at = billing.now(), lease_owner = null, lease_expires_at = null
   where x.id = n.id;
  return billing.recorded_of(n.id::text, 'delivered', true);
end
$$;
revoke execute on function billing.service_record_notification_delivered(bigint, uuid) from public;
grant execute on function billing.service_record_notification_delivered(bigint, uuid) to billing_service;
comment on function billing.service_record_notification_delivered(bigint, uuid) is
  'Service: marks a notification delivered (changed = false when it already was). billing_service '
  'only. Raises SB400 (no token), SB404 (unknown notification).';

-- ---------------------------------------------------------------------------------------------
-- Registration: only an envelope is accepted as the billing key's ciphertext
-- ---------------------------------------------------------------------------------------------
create or replace function billing.service_complete_registration(customer_key text, billing_key_ciphertext bytea,
                                                      billing_key_key_id text, billing_key_sha256 text,
                                                      card jsonb)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  r billing.card_registrations;
  pm billing.payment_methods;
  s billing.subscriptions;
  pl billing.plans;
  p billing.billing_periods;
  a billing.charge_attempts;
  v_now timestamptz := billing.now();
  v_card jsonb := coalesce(case when pg_catalog.jsonb_typeof(card -> 'card') = 'object' then card -> 'card' end, card);
  v_replace jsonb;
begin
  if customer_key is null then
    raise exception 'customer_key is required' using errcode = 'SB400';
  end if;
  if not billing.is_key_envelope(billing_key_ciphertext, billing_key_key_id) then
    raise exception 'billing_key_ciphertext is not a billing-key envelope v1 under key id % (see billing.is_key_envelope)',
      billing_key_key_id using errcode = 'SB400';
  end if;
  if billing_key_sha256 is null or billing_key_sha256 !~ '^[0-9a-f]{64}$' then
    raise exception 'billing_key_sha256 must be 64 lowercase hex digits' using errcode = 'SB400';
  end if;
  if card is not null and (pg_catalog.jsonb_typeof(card) <> 'object'
                           or pg_catalog.jsonb_typeof(v_card) <> 'object') then
    raise exception 'card must be a JSON object (Toss Billing or its card field)' using errcode = 'SB400';
  end if;
  -- Only the ciphertext may ever reach the database.
  if card ? 'billingKey' or coalesce(v_card ? 'billingKey', false) then
    raise exception 'card must not contain the billing key' using errcode = 'SB400';
  end if;
  if pg_catalog.length(coalesce(v_card ->> 'number', card ->> 'cardNumber')) > 30 then
    raise exception 'card number (masked) is longer than 30 characters' using errcode = 'SB400';
  end if;

  select * into r from billing.card_registrations cr
   where cr.customer_key = service_complete_registration.customer_key;
  if not found then
    raise exception 'registration with customer key % not found', customer_key using errcode = 'SB404';
  end if;
  -- Registrations of one customer are serialised on the customer row.
  perform 1 from billing.customers cu where cu.id = r.customer_id for update;
  select * into strict r from billing.card_registrations cr where cr.id = r.id for update;

  if r.status = 'completed' then
    select * into strict pm from billing.payment_methods where id = r.payment_method_id;
    if pm.billing_key_sha256 = service_complete_registration.billing_key_sha256 then
      return pg_catalog.jsonb_build_object('registrationId', r.id, 'subscriptionId', r.subscription_id,
                                           'paymentMethodId', pm.id, 'replay', true);
    end if;
    raise exception 'registration % was already completed with another billing key', r.id using errcode = 'SB409';
  end if;
  if r.status <> 'pending' then
    raise exception 'registration % is %, not pending', r.id, r.status using errcode = 'SB409';
  end if;
  if r.expires_at <= v_now then
    raise exception 'registration % expired at %', r.id, r.expires_at using errcode = 'SB409';
  end if;
  if exists (select 1 from billing.payment_methods x
              where x.billing_key_sha256 = service_complete_registration.billing_key_sha256) then
    raise exception 'billing key % is already registered', billing_key_sha256 using errcode = 'SB409';
  end if;

  insert into billing.payment_methods (customer_id, user_id, registration_id, customer_key, billing_key_ciphertext,
                                       billing_key_key_id, billing_key_sha256, card_number_masked, issuer_code,
                                       acquirer_code, card_type, owner_type, status_reason)
  values (r.customer_id, r.user_id, r.id, r.customer_key, billing_key_ciphertext, billing_key_key_id,
          billing_key_sha256, coalesce(v_card ->> 'number', card ->> 'cardNumber'), v_card ->> 'issuerCode',
          v_card ->> 'acquirerCode', v_card ->> 'cardType', v_card ->> 'ownerType', 'billing key issued')
  returning * into pm;

  select * into s from billing.subscriptions su
   where su.customer_id = r.customer_id and su.status in ('incomplete', 'active', 'past_due')
     for update;
  if found then
    v_replace := billing.replace_card(s.id, pm.id);
  else
    select * into strict pl from billing.plans where id = r.plan_id;
    insert into billing.subscriptions (customer_id, user_id, plan_id, status, status_reason, billing_anchor,
                                       current_period_starts_at, current_period_ends_at, payment_method_id,
                                       grace_ends_at)
    values (r.customer_id, r.user_id, r.plan_id, 'incomplete', 'card registered', v_now, v_now,
            billing.period_start(v_now, 1), pm.id, v_now + pl.incomplete_grace)
    returning * into s;
    p := billing.open_period(s.id, 1, 'first period');
    -- Charged right away, so a card that cannot pay is known at once.
    a := billing.create_attempt(p.id, v_now, 'first charge');
  end if;

  update billing.card_registrations cr
     set status = 'completed', status_reason = 'billing key issued', completed_at = v_now,
         payment_method_id = pm.id, subscription_id = s.id
   where cr.id = r.id and cr.status = 'pending';
  if not found then
    raise exception 'registration % is no longer pending', r.id using errcode = 'SB409';
  end if;
  select * into strict r from billing.card_registrations cr where cr.id = r.id;

  return pg_catalog.jsonb_build_object('registrationId', r.id, 'subscriptionId', s.id, 'paymentMethodId', pm.id,
                                       'attemptId', coalesce(a.id, (v_replace ->> 'attemptId')::uuid),
                                       'replacedPaymentMethodId', v_replace -> 'replacedPaymentMethodId',
                                       'replay', false);
end
$$;
comment on function billing.service_complete_registration(text, bytea, text, text, jsonb) is
  'Service: records the billing key issued for a pending registration as the service''s envelope '
  '(billing.is_key_envelope), its key id and sha256, and the card details of the Toss Billing object '
  '(never the key itself). Creates the subscription with period 1 and its first attempt due now, or '
  'replaces the card of the live subscription. Idempotent for the same key. billing_service only. '
  'Raises SB400 (bad input, not an envelope), SB404 (unknown customer key), SB409 (not pending, '
  'expired, key already registered), SB422 (no price in effect).';

-- ---------------------------------------------------------------------------------------------
-- Subscriber API: cancel during a charge, resume, consume a credit
-- ---------------------------------------------------------------------------------------------
create or replace function api.cancel_subscription()
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
  elsif billing.charge_possibly_sent(s.id) then
    -- A charge for the unpaid period may already be at Toss and cannot be called back. The claim
    -- locks this subscription too, so no new charge starts from here on; the one in flight decides:
    -- an approval keeps the subscription to the end of the period it paid for, anything else ends
    -- it at once (billing.settle_pending_cancel).
    if not s.cancel_at_period_end then
      update billing.subscriptions su
         set cancel_at_period_end = true, cancel_requested_at = v_now,
             status_reason = 'cancel requested by subscriber during a charge'
       where su.id = s.id;
      perform billing.notify_subscriber('cancel_scheduled', s.id,
        pg_catalog.jsonb_build_object('endsAt', null, 'chargeInFlight', true));
    end if;
    return billing.subscription_json(s.id) || pg_catalog.jsonb_build_object('chargeInFlight', true);
  else
    -- Nothing paid for the current period and nothing in flight: end now rather than keep charging
    -- a leaving subscriber.
    update billing.subscriptions su
       set cancel_requested_at = v_now
     where su.id = s.id and su.status in ('incomplete', 'active', 'past_due');
    perform billing.end_subscription(s.id, 'canceled', 'void', 'canceled by subscriber while ' || s.status);
  end if;
  return billing.subscription_json(s.id);
end
$$;
comment on function api.cancel_subscription() is
  'Subscriber: cancels the caller''s subscription — at the end of the current period when it is paid '
  '(repeating it changes nothing); while a charge for an unpaid period is in flight, when that charge '
  'resolves (approved: at the end of the period it paid; otherwise at once; the result says '
  'chargeInFlight); otherwise at once (incomplete, past_due, a renewal not yet sent). Returns the '
  'subscription. authenticated only. Raises SB401, SB404 (no live subscription).';
create or replace function api.resume_subscription()
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
     and su.current_period_ends_at > billing.now();
  if not found then
    raise exception 'subscription % is not scheduled to cancel (or its period has ended)', s.id
      using errcode = 'SB409';
  end if;
  select * into strict s from billing.subscriptions su where su.id = s.id;
  perform billing.notify_subscriber('resumed', s.id,
    pg_catalog.jsonb_build_object('nextChargeAt', s.current_period_ends_at));
  return billing.subscription_json(s.id);
end
$$;
comment on function api.resume_subscription() is
  'Subscriber: withdraws a cancellation scheduled for the end of the period, before it ends. '
  'authenticated only. Raises SB401, SB404 (no live subscription), SB409 (not scheduled to cancel, '
  'or the period already ended).';
create or replace function api.consume_credit(reason text)
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
  -- Blank means any run of white space (tabs and newlines too), not only spaces.
  if reason is null or reason ~ '^[[:space:]]*$' or pg_catalog.length(reason) > 200 then
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
comment on function api.consume_credit(text) is
  'Subscriber: spends one credit (the one expiring first) for the given reason, atomically; the '
  'balance never goes below zero. Returns the entry and the new balance. authenticated only. '
  'Raises SB401, SB400 (reason blank or over 200 characters), SB422 (no credits left).';

-- ---------------------------------------------------------------------------------------------
-- The webhook inbox: no billing key, no header outside the allow-list
-- ---------------------------------------------------------------------------------------------
create function billing.redact_billing_keys(doc jsonb)
returns jsonb
language plpgsql
immutable
set search_path = ''
as $$
declare
  v_out jsonb;
  k text;
  v jsonb;
begin
  case pg_catalog.jsonb_typeof(doc)
    when 'object' then
      v_out := '{}';
      for k, v in select e.key, e.value from pg_catalog.jsonb_each(doc) as e loop
        if k = 'billingKey' and pg_catalog.jsonb_typeof(v) = 'string' then
          -- Only its sha256 is kept: enough to find the payment method (BILLING_DELETED).
          v_out := v_out || pg_catalog.jsonb_build_object('billingKeySha256',
            pg_catalog.encode(extensions.digest(pg_catalog.convert_to(v #>> '{}', 'UTF8'), 'sha256'), 'hex'));
        elsif k = 'billingKey' then
          continue;
        else
          v_out := v_out || pg_catalog.jsonb_build_object(k, billing.redact_billing_keys(v));
        end if;
      end loop;
      return v_out;
    when 'array' then
      select coalesce(pg_catalog.jsonb_agg(billing.redact_billing_keys(e.value) order by e.n), '[]'::jsonb)
        into v_out
        from pg_catalog.jsonb_array_elements(doc) with ordinality as e(value, n);
      return v_out;
    else
      return doc;
  end case;
end
$$;
revoke execute on function billing.redact_billing_keys(jsonb) from public;
comment on function billing.redact_billing_keys(jsonb) is
  'A JSON document with every "billingKey" member, at any depth, replaced by "billingKeySha256" '
  '(lowercase hex sha256 of the UTF-8 key). Owner only. Raises nothing.';

create function billing.webhook_headers(headers jsonb)
returns jsonb
language sql
immutable
set search_path = ''
as $$
  select coalesce(pg_catalog.jsonb_object_agg(pg_catalog.lower(h.key), h.value), '{}'::jsonb)
    from pg_catalog.jsonb_each(case when pg_catalog.jsonb_typeof(headers) = 'object' then headers else '{}' end) h
   where pg_catalog.lower(h.key) in ('tosspayments-webhook-transmission-id',
                                     'tosspayments-webhook-transmission-time',
                                     'tosspayments-webhook-transmission-retried-count',
                                     'tosspayments-webhook-signature',
                                     'content-type', 'user-agent')
     and pg_catalog.jsonb_typeof(h.value) = 'string'
     and pg_catalog.length(h.value #>> '{}') <= 500
$$;
revoke execute on function billing.webhook_headers(jsonb) from public;
comment on function billing.webhook_headers(jsonb) is
  'The request headers worth keeping with a webhook: Toss''s transmission headers, content type and '
  'user agent (names lowercased, string values up to 500 characters); Authorization, cookies and '
  'anything else are dropped. Owner only. Raises nothing.';

create or replace function billing.service_ingest_webhook(transmission_id text, event_type text, payload jsonb,
                                               headers jsonb default '{}')
returns table (webhook_event_id uuid, status text, resolved_event_type text, duplicate boolean)
language plpgsql
security definer
set search_path = ''
as $$
declare
  w billing.webhook_events;
  v_type text := coalesce(nullif(service_ingest_webhook.event_type, ''), payload ->> 'eventType');
  -- Never a billing key in the clear, wherever it sits and whatever the type claims to be.
  v_payload jsonb := billing.redact_billing_keys(payload);
  v_status billing.webhook_status := 'received';
  v_reason text := 'stored';
begin
  if transmission_id is null or pg_catalog.length(transmission_id) not between 1 and 200 then
    raise exception 'transmission_id must be 1–200 characters' using errcode = 'SB400';
  end if;
  if payload is null or pg_catalog.jsonb_typeof(payload) <> 'object' then
    raise exception 'webhook payload must be a JSON object' using errcode = 'SB400';
  end if;
  if headers is not null and pg_catalog.jsonb_typeof(headers) <> 'object' then
    raise exception 'webhook headers must be a JSON object' using errcode = 'SB400';
  end if;
  -- DEPOSIT_CALLBACK is flat and has no eventType.
  if v_type is null and payload ? 'secret' and payload ? 'orderId' and payload ? 'status' then
    v_type := 'DEPOSIT_CALLBACK';
  end if;
  if v_type is null or pg_catalog.length(v_type) > 100 then
    raise exception 'webhook % has no usable event type', transmission_id using errcode = 'SB400';
  end if;

  select * into w from billing.webhook_events we where we.transmission_id = service_ingest_webhook.transmission_id;
  if found then
    return query select w.id, w.status::text, w.event_type, true;
    return;
  end if;

  if v_type = 'BILLING_DELETED' then
    null;  -- processed by the service: service_mark_payment_method_deleted(data.billingKeySha256)
  elsif v_type = 'DEPOSIT_CALLBACK' then
    -- Genuine only if the secret matches the one stored with that order's payment.
    if not exists (select 1 from billing.payments p
                    where p.order_id = payload ->> 'orderId' and p.secret is not null
                      and p.secret = payload ->> 'secret') then
      v_status := 'ignored';
      v_reason := 'secret does not match a stored payment';
    end if;
  elsif v_type = 'PAYMENT_STATUS_CHANGED' then
    -- Never applied as sent (the service re-fetches the payment), and one whose secret contradicts
    -- the secret stored with that payment did not come from Toss. A payment not stored yet (its
    -- charge answer was lost) is kept: the re-fetch decides.
    if exists (select 1 from billing.payments p
                where (p.payment_key = payload -> 'data' ->> 'paymentKey'
                       or p.order_id = payload -> 'data' ->> 'orderId')
                  and p.secret is not null
                  and p.secret is distinct from payload -> 'data' ->> 'secret') then
      v_status := 'ignored';
      v_reason := 'secret does not match the stored payment';
    end if;
  else
    v_status := 'ignored';
    v_reason := 'event type not handled';
  end if;

  insert into billing.webhook_events (transmission_id, event_type, payload, headers, status, status_reason,
                                      processed_at)
  values (transmission_id, v_type, v_payload, billing.webhook_headers(headers), v_status, v_reason,
          case when v_status = 'ignored' then billing.now() end)
  on conflict on constraint webhook_events_transmission_id_key do nothing
  returning * into w;
  if w.id is null then
    -- A concurrent delivery of the same transmission won the insert.
    select * into strict w from billing.webhook_events we where we.transmission_id = service_ingest_webhook.transmission_id;
    return query select w.id, w.status::text, w.event_type, true;
    return;
  end if;
  return query select w.id, w.status::text, w.event_type, false;
end
$$;
comment on function billing.service_ingest_webhook(text, text, jsonb, jsonb) is
  'Service: stores a Toss webhook before anything else (answer 200 after this). A repeated '
  'transmission id returns the stored row with duplicate = true. Any billingKey in the payload is '
  'stored only as its sha256 (billingKeySha256), and only allow-listed headers are kept '
  '(billing.webhook_headers). DEPOSIT_CALLBACK (flat body) is ignored unless its secret matches a '
  'stored payment; PAYMENT_STATUS_CHANGED is ignored when its data.secret differs from the stored '
  'payment''s; unknown event types are stored as ignored. billing_service only. Raises SB400 (bad input).';

-- ---------------------------------------------------------------------------------------------
-- Key rotation: the service re-encrypts envelopes under its active key id, online
-- ---------------------------------------------------------------------------------------------
create function billing.service_keys_to_rotate(active_key_id text, batch integer default 100)
returns table (payment_method_id uuid, customer_key text, billing_key_ciphertext bytea, billing_key_key_id text)
language plpgsql
stable
security definer
set search_path = ''
as $$
begin
  if active_key_id is null or active_key_id !~ '^[A-Za-z0-9_.-]{1,64}$' then
    raise exception 'active_key_id must match ^[A-Za-z0-9_.-]{1,64}$' using errcode = 'SB400';
  end if;
  if batch is null or batch not between 1 and 1000 then
    raise exception 'batch must be between 1 and 1000, got %', batch using errcode = 'SB400';
  end if;
  return query
  select pm.id, pm.customer_key, pm.billing_key_ciphertext, pm.billing_key_key_id
    from billing.payment_methods pm
   where pm.billing_key_key_id <> active_key_id
   order by pm.id
   limit batch;
end
$$;
revoke execute on function billing.service_keys_to_rotate(text, integer) from public;
grant execute on function billing.service_keys_to_rotate(text, integer) to billing_service;
comment on function billing.service_keys_to_rotate(text, integer) is
  'Service (saju-billing keys rotate): up to batch payment methods whose billing key is sealed under '
  'another key id than the active one, deleted ones included (their envelope still holds a key). '
  'billing_service only. Raises SB400.';

create function billing.service_record_key_rotated(payment_method_id uuid, old_key_id text,
                                                   billing_key_ciphertext bytea, billing_key_key_id text)
returns billing.recorded
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_id uuid;
begin
  if not billing.is_key_envelope(billing_key_ciphertext, billing_key_key_id) then
    raise exception 'billing_key_ciphertext is not a billing-key envelope v1 under key id %', billing_key_key_id
      using errcode = 'SB400';
  end if;
  -- Compare and set: a row another rotation (or a new card) changed meanwhile is left alone.
  update billing.payment_methods pm
     set billing_key_ciphertext = service_record_key_rotated.billing_key_ciphertext,
         billing_key_key_id = service_record_key_rotated.billing_key_key_id
   where pm.id = service_record_key_rotated.payment_method_id and pm.billing_key_key_id = old_key_id
  returning pm.id into v_id;
  if v_id is null then
    if not exists (select 1 from billing.payment_methods pm where pm.id = service_record_key_rotated.payment_method_id) then
      raise exception 'payment method % not found', payment_method_id using errcode = 'SB404';
    end if;
    return billing.recorded_of(payment_method_id::text, 'unchanged', false);
  end if;
  perform billing.log_event('payment_methods', v_id, 'billing_key_rotated', null,
    pg_catalog.jsonb_build_object('from', old_key_id, 'to', billing_key_key_id));
  return billing.recorded_of(v_id::text, 'rotated', true);
end
$$;
revoke execute on function billing.service_record_key_rotated(uuid, text, bytea, text) from public;
grant execute on function billing.service_record_key_rotated(uuid, text, bytea, text) to billing_service;
comment on function billing.service_record_key_rotated(uuid, text, bytea, text) is
  'Service: stores a payment method''s billing key re-sealed under a new key id, only if it is still '
  'under old_key_id (changed = false otherwise). billing_service only. Raises SB400 (not an envelope), '
  'SB404 (unknown payment method).';

-- ---------------------------------------------------------------------------------------------
-- Reconciliation: every day the service pages through Toss's transactions of the previous KST
-- day; an approval Toss has and the ledger lacks is fetched and applied like a late approval,
-- and a payment the ledger has that Toss did not list is an alert.
-- ---------------------------------------------------------------------------------------------
create type billing.reconciliation_status as enum ('requested', 'claimed', 'done', 'failed');

create table billing.reconciliation_runs (
  id uuid not null default gen_random_uuid(),
  window_start timestamptz not null,
  window_end timestamptz not null,
  status billing.reconciliation_status not null default 'requested',
  status_reason text,
  not_before timestamptz not null default billing.now(),
  lease_owner text,
  lease_expires_at timestamptz,
  lease_token uuid,
  attempts integer not null default 0,
  listed_count integer,
  unknown_count integer,
  missing_count integer,
  error_code text,
  error_message text,
  finished_at timestamptz,
  created_at timestamptz not null default billing.now(),
  constraint reconciliation_runs_pkey primary key (id),
  constraint reconciliation_runs_window_key unique (window_start, window_end),
  constraint reconciliation_runs_window_check
    check (window_end > window_start and window_end - window_start <= interval '31 days'),
  constraint reconciliation_runs_lease_check
    check ((status = 'claimed') = (lease_owner is not null and lease_expires_at is not null
                                   and lease_token is not null)),
  constraint reconciliation_runs_attempts_check check (attempts >= 0)
);
create index reconciliation_runs_claimable_idx
  on billing.reconciliation_runs (not_before, id) where status in ('requested', 'claimed');
create index payments_approved_at_idx on billing.payments (approved_at);
alter table billing.reconciliation_runs enable row level security;
revoke all on billing.reconciliation_runs from public, anon, authenticated, service_role;
create trigger reconciliation_runs_audit_insert after insert on billing.reconciliation_runs
  for each row execute function billing.audit_status();
create trigger reconciliation_runs_audit_status after update of status on billing.reconciliation_runs
  for each row when (old.status is distinct from new.status) execute function billing.audit_status();
comment on table billing.reconciliation_runs is
  'Reconciliation of one window of Toss transactions against the ledger (a work queue).';

create function billing.request_reconciliation(window_start timestamptz, window_end timestamptz)
returns uuid
language plpgsql
set search_path = ''
as $$
declare
  v_id uuid;
begin
  if window_start is null or window_end is null or window_end <= window_start
     or window_end - window_start > interval '31 days' then
    raise exception 'a window of at most 31 days is required, got % – %', window_start, window_end
      using errcode = 'SB400';
  end if;
  insert into billing.reconciliation_runs (window_start, window_end, status_reason)
  values (window_start, window_end, 'requested')
  on conflict on constraint reconciliation_runs_window_key do nothing
  returning id into v_id;
  if v_id is null then
    -- The same window again: run it once more (a fix may have landed since).
    update billing.reconciliation_runs r
       set status = 'requested', status_reason = 'requested again', not_before = billing.now()
     where r.window_start = request_reconciliation.window_start
       and r.window_end = request_reconciliation.window_end and r.status in ('done', 'failed')
    returning r.id into v_id;
    if v_id is null then
      select r.id into v_id from billing.reconciliation_runs r
       where r.window_start = request_reconciliation.window_start
         and r.window_end = request_reconciliation.window_end;
    end if;
  end if;
  return v_id;
end
$$;
revoke execute on function billing.request_reconciliation(timestamptz, timestamptz) from public;
comment on function billing.request_reconciliation(timestamptz, timestamptz) is
  'Operator: queues the reconciliation of a window of Toss transactions (at most 31 days); a window '
  'already reconciled is run again. Returns the run id. Owner (postgres) only. Raises SB400.';

create function billing.schedule_reconciliation()
returns uuid
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_day date := (pg_catalog.timezone('Asia/Seoul', billing.now()))::date - 1;
  v_id uuid;
begin
  v_id := billing.request_reconciliation(pg_catalog.timezone('Asia/Seoul', v_day::timestamp),
                                         pg_catalog.timezone('Asia/Seoul', (v_day + 1)::timestamp));
  perform billing.ring_service(pg_catalog.jsonb_build_object('reconciliation', v_id));
  return v_id;
end
$$;
revoke execute on function billing.schedule_reconciliation() from public;
comment on function billing.schedule_reconciliation() is
  'Scheduler (pg_cron, daily at 03:00 KST = 18:00 UTC): queues the reconciliation of the previous '
  'Asia/Seoul day and rings the service. Owner only. Raises nothing of its own.';

create function billing.service_claim_reconciliations(worker text, batch integer default 1,
                                                      lease interval default interval '10 minutes')
returns table (reconciliation_id uuid, lease_token uuid, window_start timestamptz, window_end timestamptz,
               lease_expires_at timestamptz)
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_now timestamptz := billing.now();
begin
  perform billing.check_claim_args(worker, batch, lease);
  return query
  with picked as (
    select r.id
      from billing.reconciliation_runs r
     where r.status in ('requested', 'claimed') and r.not_before <= v_now
       -- A run whose lease ran out is claimable again (its token changes).
       and (r.status = 'requested' or r.lease_expires_at <= v_now)
     order by r.not_before, r.id
     limit batch
       for update skip locked
  )
  update billing.reconciliation_runs r
     set status = 'claimed', status_reason = 'claimed by ' || worker, lease_owner = worker,
         lease_expires_at = v_now + lease, lease_token = pg_catalog.gen_random_uuid(),
         attempts = r.attempts + 1
    from picked
   where r.id = picked.id
  returning r.id, r.lease_token, r.window_start, r.window_end, r.lease_expires_at;
end
$$;
revoke execute on function billing.service_claim_reconciliations(text, integer, interval) from public;
grant execute on function billing.service_claim_reconciliations(text, integer, interval) to billing_service;
comment on function billing.service_claim_reconciliations(text, integer, interval) is
  'Service: claims reconciliation runs under a lease with a fresh lease_token. For each, list GET '
  '/v1/transactions for [window_start, window_end], fetch and apply (service_apply_payment_snapshot) '
  'every payment service_unknown_payment_keys names, then service_record_reconciliation. '
  'billing_service only. Raises SB400.';

create function billing.service_unknown_payment_keys(payment_keys text[])
returns table (payment_key text)
language sql
stable
security definer
set search_path = ''
as $$
  select distinct k.key
    from pg_catalog.unnest(coalesce(payment_keys, '{}')) as k(key)
   where k.key is not null
     and not exists (select 1 from billing.payments p where p.payment_key = k.key)
$$;
revoke execute on function billing.service_unknown_payment_keys(text[]) from public;
grant execute on function billing.service_unknown_payment_keys(text[]) to billing_service;
comment on function billing.service_unknown_payment_keys(text[]) is
  'Service: the payment keys (from Toss''s transaction list) that the ledger does not hold; each is '
  'fetched and applied. billing_service only. Raises nothing.';

create function billing.service_record_reconciliation(reconciliation_id uuid, lease_token uuid,
                                                      payment_keys text[] default null,
                                                      error_code text default null,
                                                      error_message text default null)
returns billing.recorded
language plpgsql
security definer
set search_path = ''
as $$
declare
  r billing.reconciliation_runs;
  v_unknown text[];
  v_missing record;
  v_missing_count integer := 0;
  v_now timestamptz := billing.now();
begin
  if (payment_keys is null) = (error_code is null) then
    raise exception 'give either the listed payment keys or an error code' using errcode = 'SB400';
  end if;
  if pg_catalog.length(error_code) > 100 or pg_catalog.length(error_message) > 510 then
    raise exception 'error_code (≤ 100) or error_message (≤ 510) too long' using errcode = 'SB400';
  end if;
  select * into r from billing.reconciliation_runs x
   where x.id = service_record_reconciliation.reconciliation_id for update;
  if not found then
    raise exception 'reconciliation run % not found', reconciliation_id using errcode = 'SB404';
  end if;
  perform billing.check_lease_token('reconciliation run', r.id::text, r.lease_token, lease_token);
  if r.status <> 'claimed' then
    return billing.recorded_of(r.id::text, r.status::text, false);
  end if;

  if error_code is not null then
    update billing.reconciliation_runs x
       set status = case when x.attempts < 5 then 'requested'::billing.reconciliation_status else 'failed' end,
           status_reason = 'error: ' || service_record_reconciliation.error_code,
           not_before = v_now + billing.backoff(x.attempts, interval '5 minutes', interval '2 hours'),
           lease_owner = null, lease_expires_at = null,
           error_code = service_record_reconciliation.error_code,
           error_message = service_record_reconciliation.error_message
     where x.id = r.id
    returning * into r;
    if r.status = 'failed' then
      perform billing.raise_alert('reconciliation failed', 'reconciliation_runs', r.id,
        pg_catalog.jsonb_build_object('code', r.error_code, 'message', r.error_message));
    end if;
    return billing.recorded_of(r.id::text, r.status::text, true);
  end if;

  -- Approved at Toss, still not in the ledger (the service fetched and applied each before).
  select pg_catalog.array_agg(u.payment_key) into v_unknown
    from billing.service_unknown_payment_keys(payment_keys) u;
  if v_unknown is not null then
    perform billing.raise_alert('approved at Toss but missing from the ledger', 'reconciliation_runs', r.id,
      pg_catalog.jsonb_build_object('paymentKeys', v_unknown));
  end if;
  -- In the ledger as approved in the window, but not listed by Toss.
  for v_missing in
    select p.id, p.payment_key, p.order_id, p.total_amount
      from billing.payments p
     where p.approved_at >= r.window_start and p.approved_at < r.window_end
       -- <> all over the keys without nulls: one null would make "= any" unknown for every row.
       and p.payment_key <> all (pg_catalog.array_remove(payment_keys, null))
  loop
    v_missing_count := v_missing_count + 1;
    perform billing.raise_alert('in the ledger but not listed by Toss', 'payments', v_missing.id,
      pg_catalog.jsonb_build_object('paymentKey', v_missing.payment_key, 'orderId', v_missing.order_id,
                                    'amount', v_missing.total_amount, 'reconciliationId', r.id));
  end loop;
  update billing.reconciliation_runs x
     set status = 'done', status_reason = 'reconciled', lease_owner = null, lease_expires_at = null,
         listed_count = pg_catalog.cardinality(payment_keys),
         unknown_count = coalesce(pg_catalog.cardinality(v_unknown), 0),
         missing_count = v_missing_count, finished_at = v_now, error_code = null, error_message = null
   where x.id = r.id
  returning * into r;
  return billing.recorded_of(r.id::text, r.status::text, true,
    pg_catalog.jsonb_build_object('listed', r.listed_count, 'unknown', r.unknown_count,
                                  'missing', r.missing_count));
end
$$;
revoke execute on function billing.service_record_reconciliation(uuid, uuid, text[], text, text) from public;
grant execute on function billing.service_record_reconciliation(uuid, uuid, text[], text, text) to billing_service;
comment on function billing.service_record_reconciliation(uuid, uuid, text[], text, text) is
  'Service: finishes a claimed reconciliation run with every payment key Toss listed in its window '
  '(after applying the unknown ones): an alert for each still missing from the ledger and for each '
  'ledger payment approved in the window that Toss did not list; or records an error (retried 5 '
  'times, then failed with an alert). Detail: listed, unknown, missing. billing_service only. Raises '
  'SB400, SB404, SB409 (stale lease).';

create function billing.ops_reconciliation_report(days integer default 30)
returns table (reconciliation_id uuid, window_start timestamptz, window_end timestamptz, status text,
               listed integer, unknown integer, missing integer, error_code text, finished_at timestamptz)
language sql
stable
set search_path = ''
as $$
  select r.id, r.window_start, r.window_end, r.status::text, r.listed_count, r.unknown_count,
         r.missing_count, r.error_code, r.finished_at
    from billing.reconciliation_runs r
   where r.window_start >= billing.now() - pg_catalog.make_interval(days => greatest(coalesce(days, 30), 1))
   order by r.window_start desc
$$;
revoke execute on function billing.ops_reconciliation_report(integer) from public;
comment on function billing.ops_reconciliation_report(integer) is
  'Operator: reconciliation runs of the last days (newest first) with how many payments Toss listed, '
  'how many the ledger lacked and how many Toss lacked. Owner (postgres) only. Raises nothing.';

-- 03:00 KST, written in UTC (pg_cron reads schedules as UTC).
select cron.schedule('saju-billing-reconcile', '0 18 * * *', 'select billing.schedule_reconciliation()');

-- ---------------------------------------------------------------------------------------------
-- Queue depths for the service's /metrics: each count walks a partial index
-- ---------------------------------------------------------------------------------------------
create function billing.service_queue_depths()
returns table (queue text, ready bigint, leased bigint, expired bigint)
language sql
stable
security definer
set search_path = ''
as $$
  -- expired: leased rows whose lease has run out and that the tick has not handed back yet.
  select 'charge_attempts',
         (select pg_catalog.count(*) from billing.charge_attempts where status in ('queued', 'unknown')
             and not_before <= billing.now()),
         (select pg_catalog.count(*) from billing.charge_attempts where status = 'claimed'),
         (select pg_catalog.count(*) from billing.charge_attempts where status = 'claimed'
             and lease_expires_at <= billing.now())
  union all
  select 'refunds',
         (select pg_catalog.count(*) from billing.refunds where status = 'requested' and not_before <= billing.now()),
         (select pg_catalog.count(*) from billing.refunds where status = 'claimed'),
         (select pg_catalog.count(*) from billing.refunds where status = 'claimed'
             and lease_expires_at <= billing.now())
  union all
  select 'webhook_events',
         (select pg_catalog.count(*) from billing.webhook_events where status = 'received'
             and not_before <= billing.now()),
         (select pg_catalog.count(*) from billing.webhook_events where status = 'processing'),
         (select pg_catalog.count(*) from billing.webhook_events where status = 'processing'
             and lease_expires_at <= billing.now())
  union all
  select 'key_deletions',
         (select pg_catalog.count(*) from billing.key_deletions where status = 'requested'
             and not_before <= billing.now()),
         (select pg_catalog.count(*) from billing.key_deletions where status = 'claimed'),
         (select pg_catalog.count(*) from billing.key_deletions where status = 'claimed'
             and lease_expires_at <= billing.now())
  union all
  select 'notifications',
         (select pg_catalog.count(*) from billing.notifications where delivered_at is null
             and (lease_expires_at is null or lease_expires_at <= billing.now())),
         (select pg_catalog.count(*) from billing.notifications where delivered_at is null
             and lease_expires_at > billing.now()),
         0::bigint  -- an expired notification lease is simply claimable again
$$;
revoke execute on function billing.service_queue_depths() from public;
grant execute on function billing.service_queue_depths() to billing_service;
comment on function billing.service_queue_depths() is
  'Service (/metrics): per work queue, the rows ready to claim now, the rows under a lease, and the '
  'leased rows whose lease ran out (a worker died or hangs; the tick hands them back). '
  'billing_service only. Raises nothing.';

-- ---------------------------------------------------------------------------------------------
-- Where the doorbell rings: set up (and changed) by an operator, never by a migration
-- ---------------------------------------------------------------------------------------------
create function billing.ops_configure_doorbell(service_url text, doorbell_token text)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_name text;
  v_value text;
  v_id uuid;
  v_changed text[] := '{}';
begin
  if service_url is null or service_url !~ '^https?://[^/?#[:space:]]+[^?#[:space:]]*$'
     or pg_catalog.length(service_url) > 500 then
    raise exception 'service_url must be an http(s) URL of at most 500 characters' using errcode = 'SB400';
  end if;
  if doorbell_token is null or pg_catalog.length(doorbell_token) not between 16 and 500
     or doorbell_token ~ '[[:space:]]' then
    raise exception 'doorbell_token must be 16–500 characters without white space' using errcode = 'SB400';
  end if;
  foreach v_name in array array['saju_billing_service_url', 'saju_billing_doorbell_token'] loop
    v_value := case v_name when 'saju_billing_service_url' then pg_catalog.rtrim(service_url, '/')
                           else doorbell_token end;
    select ds.id into v_id from vault.decrypted_secrets ds where ds.name = v_name;
    if v_id is null then
      perform vault.create_secret(v_value, v_name, 'saju-billing doorbell (billing.ring_service)');
      v_changed := v_changed || v_name;
    elsif (select ds.decrypted_secret from vault.decrypted_secrets ds where ds.id = v_id) is distinct from v_value then
      perform vault.update_secret(v_id, v_value);
      v_changed := v_changed || v_name;
    end if;
  end loop;
  perform billing.log_event('doorbell', null, 'doorbell_configured', null,
                            pg_catalog.jsonb_build_object('serviceUrl', pg_catalog.rtrim(service_url, '/'),
                                                          'changed', v_changed));
  return pg_catalog.jsonb_build_object('serviceUrl', pg_catalog.rtrim(service_url, '/'), 'changed', v_changed);
end
$$;
revoke execute on function billing.ops_configure_doorbell(text, text) from public;
comment on function billing.ops_configure_doorbell(text, text) is
  'Operator: stores (or updates) the service URL and doorbell token that billing.tick rings, as '
  'Vault secrets saju_billing_service_url and saju_billing_doorbell_token; safe to run again. The '
  'token is never logged. Owner (postgres) only. Raises SB400 (not an http(s) URL; token not 16–500 '
  'characters without white space).';

-- ---------------------------------------------------------------------------------------------
-- The surface check, as a function every later migration ends with
-- ---------------------------------------------------------------------------------------------
create function billing.assert_surface_locked_down()
returns void
language plpgsql
set search_path = ''
as $$
declare
  v_bad text;
begin
  -- No table in billing without row-level security.
  select pg_catalog.string_agg(c.relname, ', ') into v_bad
    from pg_catalog.pg_class c
   where c.relnamespace = 'billing'::regnamespace and c.relkind in ('r', 'p') and not c.relrowsecurity;
  if v_bad is not null then
    raise exception 'billing tables without row-level security: %', v_bad;
  end if;

  -- Security-definer functions pin an empty search_path.
  select pg_catalog.string_agg(p.oid::regprocedure::text, ', ') into v_bad
    from pg_catalog.pg_proc p
   where p.pronamespace in ('billing'::regnamespace, 'api'::regnamespace) and p.prosecdef
     and not coalesce(p.proconfig @> array['search_path=""'], false);
  if v_bad is not null then
    raise exception 'security-definer functions without search_path = '''': %', v_bad;
  end if;

  -- Nothing is executable by PUBLIC; api only by authenticated; service_* only by billing_service.
  select pg_catalog.string_agg(p.oid::regprocedure::text, ', ') into v_bad
    from pg_catalog.pg_proc p
   where p.pronamespace in ('billing'::regnamespace, 'api'::regnamespace, 'analytics'::regnamespace)
     and (exists (select 1 from pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))) a
                   where a.grantee = 0 and a.privilege_type = 'EXECUTE')
          or (p.pronamespace = 'api'::regnamespace
              and (pg_catalog.has_function_privilege('anon', p.oid, 'execute')
                   or pg_catalog.has_function_privilege('billing_service', p.oid, 'execute')
                   or not pg_catalog.has_function_privilege('authenticated', p.oid, 'execute')))
          or (p.pronamespace = 'billing'::regnamespace
              and (pg_catalog.has_function_privilege('authenticated', p.oid, 'execute')
                   or pg_catalog.has_function_privilege('service_role', p.oid, 'execute')
                   or pg_catalog.has_function_privilege('billing_service', p.oid, 'execute')
                      <> (p.proname like 'service\_%'))));
  if v_bad is not null then
    raise exception 'functions with unintended EXECUTE privileges: %', v_bad;
  end if;

  -- API roles and the service reach no table directly.
  select pg_catalog.string_agg(pg_catalog.format('%s:%s', r.rolname, c.oid::regclass), ', ') into v_bad
    from pg_catalog.pg_class c
   cross join (values ('anon'), ('authenticated'), ('service_role'), ('billing_service'), ('analyst')) as r(rolname)
   where c.relnamespace = 'billing'::regnamespace and c.relkind in ('r', 'p', 'v', 'm', 'S')
     and pg_catalog.has_table_privilege(r.rolname, c.oid, 'select, insert, update, delete, truncate, references');
  if v_bad is not null then
    raise exception 'billing relations reachable by API or service roles: %', v_bad;
  end if;
end
$$;
revoke execute on function billing.assert_surface_locked_down() from public;
comment on function billing.assert_surface_locked_down() is
  'Raises unless every billing table has RLS, every security-definer function pins search_path, '
  'nothing is executable by PUBLIC, api is for authenticated only, service_* for billing_service '
  'only, and no API or service role reaches a billing relation. Owner only; run at the end of every '
  'migration.';

select billing.assert_surface_locked_down();
