-- Functions for the billing service (role billing_service) and nobody else: card registration
-- results, claiming work (attempts, refunds, webhooks, key deletions, notifications) with
-- FOR UPDATE SKIP LOCKED and a lease, and recording what Toss answered. The service never decides
-- whether to charge; it only executes what it claims and reports back. Every entry point is
-- security definer (the role has no table privileges), pins search_path = '' and is granted to
-- billing_service right after its definition. SQLSTATEs: see 20261121200100_billing_core.sql.

-- ---------------------------------------------------------------------------------------------
-- Shared checks
-- ---------------------------------------------------------------------------------------------
create function billing.check_claim_args(worker text, batch integer, lease interval)
returns void
language plpgsql
immutable
set search_path = ''
as $$
begin
  if worker is null or pg_catalog.length(worker) not between 1 and 200 then
    raise exception 'worker must be 1–200 characters' using errcode = 'SB400';
  end if;
  if batch is null or batch not between 1 and 100 then
    raise exception 'batch must be between 1 and 100, got %', batch using errcode = 'SB400';
  end if;
  if lease is null or lease < interval '10 seconds' or lease > interval '1 hour' then
    raise exception 'lease must be between 10 seconds and 1 hour, got %', lease using errcode = 'SB400';
  end if;
end
$$;
revoke execute on function billing.check_claim_args(text, integer, interval) from public;
comment on function billing.check_claim_args(text, integer, interval) is
  'Validates the arguments of the claim functions. Owner only. Raises SB400.';

-- The error Toss (or its billing-auth window) reported: a code and an optional message.
create function billing.check_error_args(code text, message text)
returns void
language plpgsql
immutable
set search_path = ''
as $$
begin
  if code is null or pg_catalog.length(code) not between 1 and 100 then
    raise exception 'code must be 1–100 characters' using errcode = 'SB400';
  end if;
  if pg_catalog.length(message) > 510 then
    raise exception 'message must be at most 510 characters' using errcode = 'SB400';
  end if;
end
$$;
revoke execute on function billing.check_error_args(text, text) from public;
comment on function billing.check_error_args(text, text) is
  'Validates an error code (1–100 characters) and message (at most 510) reported by the service. '
  'Owner only. Raises SB400.';

-- May an attempt be sent (again) with its orderId and key? Only while its period is the open,
-- current period of a live subscription; otherwise a possibly sent charge is looked up instead.
create function billing.resend_allowed(attempt_id uuid)
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
     where ca.id = resend_allowed.attempt_id
       and bp.status = 'open'
       and su.current_period_id = bp.id
       and su.status in ('incomplete', 'active', 'past_due'))
$$;
revoke execute on function billing.resend_allowed(uuid) from public;
comment on function billing.resend_allowed(uuid) is
  'True when an attempt''s period is still the open current period of a live subscription. Owner only. Raises nothing.';

-- Locks the subscription, then the attempt (the documented lock order).
create function billing.lock_attempt(attempt_id uuid)
returns billing.charge_attempts
language plpgsql
set search_path = ''
as $$
declare
  v_sub uuid;
  a billing.charge_attempts;
begin
  if attempt_id is null then
    raise exception 'attempt_id is required' using errcode = 'SB400';
  end if;
  select ca.subscription_id into v_sub from billing.charge_attempts ca where ca.id = lock_attempt.attempt_id;
  if not found then
    raise exception 'charge attempt % not found', attempt_id using errcode = 'SB404';
  end if;
  perform 1 from billing.subscriptions su where su.id = v_sub for update;
  select * into strict a from billing.charge_attempts ca where ca.id = lock_attempt.attempt_id for update;
  return a;
end
$$;
revoke execute on function billing.lock_attempt(uuid) from public;
comment on function billing.lock_attempt(uuid) is
  'Locks an attempt''s subscription and then the attempt. Owner only. Raises SB400 (null id), SB404 (unknown id).';

create function billing.attempt_result(a billing.charge_attempts, changed boolean, extra jsonb default '{}')
returns jsonb
language sql
immutable
set search_path = ''
as $$
  select pg_catalog.jsonb_build_object('attemptId', a.id, 'status', a.status, 'changed', changed,
                                       'notBefore', a.not_before, 'orderId', a.order_id) || coalesce(extra, '{}')
$$;
revoke execute on function billing.attempt_result(billing.charge_attempts, boolean, jsonb) from public;
comment on function billing.attempt_result(billing.charge_attempts, boolean, jsonb) is
  'The jsonb result of the attempt-recording functions. Owner only. Raises nothing.';

-- ---------------------------------------------------------------------------------------------
-- Card registration
-- ---------------------------------------------------------------------------------------------
create function billing.service_complete_registration(customer_key text, billing_key_ciphertext bytea,
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
  if billing_key_ciphertext is null or pg_catalog.octet_length(billing_key_ciphertext) not between 1 and 4096 then
    raise exception 'billing_key_ciphertext must be 1–4096 bytes' using errcode = 'SB400';
  end if;
  if billing_key_key_id is null or pg_catalog.length(billing_key_key_id) not between 1 and 100 then
    raise exception 'billing_key_key_id must be 1–100 characters' using errcode = 'SB400';
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
   where cr.id = r.id and cr.status = 'pending'
  returning * into r;
  if not found then
    raise exception 'registration % is no longer pending', r.id using errcode = 'SB409';
  end if;

  return pg_catalog.jsonb_build_object('registrationId', r.id, 'subscriptionId', s.id, 'paymentMethodId', pm.id,
                                       'attemptId', coalesce(a.id, (v_replace ->> 'attemptId')::uuid),
                                       'replacedPaymentMethodId', v_replace -> 'replacedPaymentMethodId',
                                       'replay', false);
end
$$;
revoke execute on function billing.service_complete_registration(text, bytea, text, text, jsonb) from public;
grant execute on function billing.service_complete_registration(text, bytea, text, text, jsonb) to billing_service;
comment on function billing.service_complete_registration(text, bytea, text, text, jsonb) is
  'Service: records the billing key issued for a pending registration (ciphertext, key id, sha256, '
  'card details of the Toss Billing object, never the key itself). Creates the subscription with '
  'period 1 and its first attempt due now, or replaces the card of the live subscription. Idempotent '
  'for the same key. billing_service only. Raises SB400 (bad input), SB404 (unknown customer key), '
  'SB409 (not pending, expired, key already registered), SB422 (no price in effect).';

create function billing.service_fail_registration(customer_key text, code text, message text)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  r billing.card_registrations;
begin
  if customer_key is null then
    raise exception 'customer_key is required' using errcode = 'SB400';
  end if;
  perform billing.check_error_args(code, message);
  select * into r from billing.card_registrations cr
   where cr.customer_key = service_fail_registration.customer_key for update;
  if not found then
    raise exception 'registration with customer key % not found', customer_key using errcode = 'SB404';
  end if;
  if r.status = 'failed' and r.fail_code = code then
    return pg_catalog.jsonb_build_object('registrationId', r.id, 'status', r.status, 'changed', false);
  end if;
  update billing.card_registrations cr
     set status = 'failed', status_reason = code, fail_code = code, fail_message = message
   where cr.id = r.id and cr.status = 'pending'
  returning * into r;
  if not found then
    raise exception 'registration with customer key % is not pending', customer_key using errcode = 'SB409';
  end if;
  return pg_catalog.jsonb_build_object('registrationId', r.id, 'status', r.status, 'changed', true);
end
$$;
revoke execute on function billing.service_fail_registration(text, text, text) from public;
grant execute on function billing.service_fail_registration(text, text, text) to billing_service;
comment on function billing.service_fail_registration(text, text, text) is
  'Service: records that the Toss billing-auth window failed (fail URL code and message). Idempotent '
  'for the same code. billing_service only. Raises SB400 (bad input), SB404 (unknown customer key), '
  'SB409 (not pending).';

-- ---------------------------------------------------------------------------------------------
-- Charge attempts
-- ---------------------------------------------------------------------------------------------
create function billing.service_claim_attempts(worker text, batch integer default 10,
                                               lease interval default interval '2 minutes')
returns table (attempt_id uuid, mode text, order_id text, idempotency_key uuid, amount bigint, order_name text,
               customer_key text, billing_key_ciphertext bytea, billing_key_key_id text, customer_email text,
               customer_name text, subscription_id uuid, period_id uuid, attempt_number integer,
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
    select ca.id,
           -- A queued attempt is charged only while its period still needs paying (a re-send can
           -- outlive that, e.g. when another attempt's approval paid the period); otherwise it is
           -- looked up: an earlier send may have charged, and one never sent is simply not found.
           case when ca.status = 'queued' and billing.resend_allowed(ca.id) then 'charge'::billing.attempt_mode
                else 'lookup' end as mode
      from billing.charge_attempts ca
     where ca.status in ('queued', 'unknown') and ca.not_before <= v_now
     order by ca.not_before, ca.id
     limit batch
       for update skip locked
  ), claimed as (
    update billing.charge_attempts ca
       set status = 'claimed',
           claim_mode = picked.mode,
           status_reason = case when picked.mode = 'lookup' then 'lookup by ' else 'charge by ' end || worker,
           lease_owner = worker,
           lease_expires_at = v_now + lease,
           sends = ca.sends + (picked.mode = 'charge')::integer,
           lookups = ca.lookups + (picked.mode = 'lookup')::integer
      from picked
     where ca.id = picked.id
    returning ca.*
  )
  select c.id, c.claim_mode::text, c.order_id, c.idempotency_key, c.amount, c.order_name, pm.customer_key,
         pm.billing_key_ciphertext, pm.billing_key_key_id, cu.email, cu.name, c.subscription_id, c.period_id,
         c.attempt_number, c.lease_expires_at
    from claimed c
    join billing.payment_methods pm on pm.id = c.payment_method_id
    join billing.customers cu on cu.id = pm.customer_id
   order by c.not_before, c.id;
end
$$;
revoke execute on function billing.service_claim_attempts(text, integer, interval) from public;
grant execute on function billing.service_claim_attempts(text, integer, interval) to billing_service;
comment on function billing.service_claim_attempts(text, integer, interval) is
  'Service: claims up to batch due attempts (FOR UPDATE SKIP LOCKED) under a lease and returns '
  'everything needed: mode ''charge'' (POST /v1/billing/{billingKey} with this orderId and '
  'Idempotency-Key) or ''lookup'' (GET /v1/payments/orders/{orderId} for an unknown outcome, or a '
  're-send whose period no longer needs paying). '
  'billing_service only. Raises SB400 (worker 1–200 chars, batch 1–100, lease 10 s–1 h).';

create function billing.service_record_charge_success(attempt_id uuid, payment jsonb)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
begin
  if attempt_id is null then
    raise exception 'attempt_id is required' using errcode = 'SB400';
  end if;
  return billing.apply_charge_success(attempt_id, payment);
end
$$;
revoke execute on function billing.service_record_charge_success(uuid, jsonb) from public;
grant execute on function billing.service_record_charge_success(uuid, jsonb) to billing_service;
comment on function billing.service_record_charge_success(uuid, jsonb) is
  'Service: records Toss''s approved Payment for an attempt: stores the payment, marks the period '
  'paid, activates the subscription, grants the period''s credits and queues ''renewed'' (or '
  '''activated''). Recording it again applies nothing twice. An approval for a period already paid '
  'by another attempt (or after the subscription ended) is stored unapplied, the attempt marked '
  'duplicate, and a full refund is requested automatically with an operator alert; so is an approval '
  'for another amount than the attempt''s, which also fails the attempt as a bug (AMOUNT_MISMATCH). '
  'billing_service only. Raises SB400 (malformed, other order, not approved), SB404 (unknown attempt), '
  'SB409 (a different payment already recorded).';

create function billing.service_record_charge_failure(attempt_id uuid, code text, message text,
                                                      classification text)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  a billing.charge_attempts;
  v_class billing.failure_class;
  v_now timestamptz := billing.now();
  v_target billing.attempt_status;
  v_after jsonb;
begin
  if classification is null or classification not in ('transient', 'decline', 'needs_new_card', 'reconcile', 'bug') then
    raise exception 'classification must be transient, decline, needs_new_card, reconcile or bug, got %',
      classification using errcode = 'SB400';
  end if;
  v_class := classification::billing.failure_class;
  perform billing.check_error_args(code, message);
  a := billing.lock_attempt(attempt_id);

  if v_class = 'transient' then
    -- Re-send the same attempt (same orderId and Idempotency-Key) after a backoff.
    if a.status in ('queued', 'unknown') then
      return billing.attempt_result(a, false);
    end if;
    if a.status <> 'claimed' then
      raise exception 'attempt % is %; a transient failure cannot be recorded', a.id, a.status using errcode = 'SB409';
    end if;
    if billing.resend_allowed(a.id) and a.claim_mode = 'charge' then
      update billing.charge_attempts ca
         set status = 'queued', status_reason = 'transient: ' || code, claim_mode = null, lease_owner = null,
             lease_expires_at = null, transient_failures = ca.transient_failures + 1,
             not_before = v_now + billing.backoff(ca.transient_failures + 1, interval '1 minute', interval '1 hour'),
             error_code = code, error_message = message
       where ca.id = a.id and ca.status = 'claimed'
      returning * into a;
    else
      -- A lookup failed, or the charge is no longer wanted: find out what happened first.
      update billing.charge_attempts ca
         set status = 'unknown', status_reason = 'transient during ' || ca.claim_mode || ': ' || code,
             claim_mode = null, lease_owner = null, lease_expires_at = null,
             transient_failures = ca.transient_failures + 1,
             not_before = v_now + billing.backoff(ca.lookups + 1, interval '1 minute', interval '1 hour'),
             error_code = code, error_message = message
       where ca.id = a.id and ca.status = 'claimed'
      returning * into a;
    end if;
    return billing.attempt_result(a, true);
  end if;

  if v_class = 'reconcile' then
    -- The charge may exist (DUPLICATED_ORDER_ID, ALREADY_PROCESSED_PAYMENT): look it up now.
    if a.status = 'unknown' then
      return billing.attempt_result(a, false);
    end if;
    update billing.charge_attempts ca
       set status = 'unknown', status_reason = 'reconcile: ' || code, claim_mode = null, lease_owner = null,
           lease_expires_at = null, not_before = v_now, error_code = code, error_message = message
     where ca.id = a.id and ca.status in ('claimed', 'queued')
    returning * into a;
    if not found then
      raise exception 'attempt % is not in flight; cannot reconcile', attempt_id using errcode = 'SB409';
    end if;
    return billing.attempt_result(a, true);
  end if;

  v_target := case when v_class = 'bug' then 'failed'::billing.attempt_status else 'declined' end;
  if a.status = v_target and a.classification = v_class and a.error_code = code then
    return billing.attempt_result(a, false);
  end if;
  update billing.charge_attempts ca
     set status = v_target, status_reason = v_class || ': ' || code, classification = v_class,
         error_code = code, error_message = message, claim_mode = null, lease_owner = null,
         lease_expires_at = null, resolved_at = v_now
   where ca.id = a.id and ca.status in ('claimed', 'queued', 'unknown')
  returning * into a;
  if not found then
    raise exception 'attempt % already resolved; cannot record % %', attempt_id, v_class, code
      using errcode = 'SB409';
  end if;
  v_after := billing.after_charge_failure(a.id);
  return billing.attempt_result(a, true, pg_catalog.jsonb_build_object('next', v_after));
end
$$;
revoke execute on function billing.service_record_charge_failure(uuid, text, text, text) from public;
grant execute on function billing.service_record_charge_failure(uuid, text, text, text) to billing_service;
comment on function billing.service_record_charge_failure(uuid, text, text, text) is
  'Service: records a failed charge with the service''s classification of Toss''s code: transient '
  '(same attempt re-queued with backoff, same orderId/key; a failed lookup stays unknown), decline '
  '(declined; past_due; next attempt on the dunning schedule or the end of the subscription), '
  'needs_new_card (declined; past_due; no retries until a new card), reconcile (unknown: look the '
  'order up), bug (failed; operator alert; no retry). Recording the same result again changes '
  'nothing. billing_service only. Raises SB400 (bad input), SB404 (unknown attempt), SB409 '
  '(attempt already resolved otherwise).';

create function billing.service_record_charge_unknown(attempt_id uuid, detail text)
returns jsonb
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
  a := billing.lock_attempt(attempt_id);
  if a.status = 'unknown' then
    return billing.attempt_result(a, false);
  end if;
  update billing.charge_attempts ca
     set status = 'unknown', status_reason = 'outcome unknown: ' || coalesce(detail, 'no detail'),
         claim_mode = null, lease_owner = null, lease_expires_at = null, error_message = detail,
         not_before = v_now + billing.backoff(ca.lookups + 1, interval '1 minute', interval '1 hour')
   where ca.id = a.id and ca.status in ('claimed', 'queued')
  returning * into a;
  if not found then
    raise exception 'attempt % already resolved; its outcome is known', attempt_id using errcode = 'SB409';
  end if;
  return billing.attempt_result(a, true);
end
$$;
revoke execute on function billing.service_record_charge_unknown(uuid, text) from public;
grant execute on function billing.service_record_charge_unknown(uuid, text) to billing_service;
comment on function billing.service_record_charge_unknown(uuid, text) is
  'Service: the charge (or lookup) timed out or hit a transport error after sending: the attempt '
  'becomes unknown and is handed out for a lookup after a backoff — never re-charged under a new '
  'orderId. billing_service only. Raises SB400 (detail > 510), SB404 (unknown attempt), SB409 (resolved).';

create function billing.service_record_lookup_not_found(attempt_id uuid)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  a billing.charge_attempts;
  v_now timestamptz := billing.now();
begin
  a := billing.lock_attempt(attempt_id);
  if a.status in ('queued', 'canceled') then
    return billing.attempt_result(a, false);
  end if;
  if not (a.status = 'unknown' or (a.status = 'claimed' and a.claim_mode = 'lookup')) then
    raise exception 'attempt % is % (%); only an unknown attempt can be not found', a.id, a.status, a.claim_mode
      using errcode = 'SB409';
  end if;
  if billing.resend_allowed(a.id) then
    -- Toss has no such order: nothing was charged, so the very same request can be sent again.
    update billing.charge_attempts ca
       set status = 'queued', status_reason = 'not found at Toss; re-send', claim_mode = null, lease_owner = null,
           lease_expires_at = null, not_before = v_now
     where ca.id = a.id and (ca.status = 'unknown' or (ca.status = 'claimed' and ca.claim_mode = 'lookup'))
    returning * into a;
  else
    update billing.charge_attempts ca
       set status = 'canceled', status_reason = 'not found at Toss; no longer needed', claim_mode = null,
           lease_owner = null, lease_expires_at = null, resolved_at = v_now
     where ca.id = a.id and (ca.status = 'unknown' or (ca.status = 'claimed' and ca.claim_mode = 'lookup'))
    returning * into a;
  end if;
  return billing.attempt_result(a, true);
end
$$;
revoke execute on function billing.service_record_lookup_not_found(uuid) from public;
grant execute on function billing.service_record_lookup_not_found(uuid) to billing_service;
comment on function billing.service_record_lookup_not_found(uuid) is
  'Service: GET /v1/payments/orders/{orderId} answered NOT_FOUND_PAYMENT for an unknown attempt, so '
  'nothing was charged: the same attempt (same orderId and Idempotency-Key) is queued again, or '
  'canceled if its period no longer needs paying. Idempotent. billing_service only. Raises SB404 '
  '(unknown attempt), SB409 (attempt not awaiting a lookup).';

-- ---------------------------------------------------------------------------------------------
-- Payment snapshots (webhook re-fetches, lookups, reconciliation)
-- ---------------------------------------------------------------------------------------------
create function billing.service_apply_payment_snapshot(payment jsonb)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v record;
  a billing.charge_attempts;
  pay billing.payments;
begin
  select * into v from billing.parse_payment(payment);
  select * into a from billing.charge_attempts ca where ca.order_id = v.order_id;
  if found then
    if v.status in ('DONE', 'CANCELED', 'PARTIAL_CANCELED') and v.approved_at is not null then
      return pg_catalog.jsonb_build_object('matched', 'attempt') || billing.apply_charge_success(a.id, payment);
    end if;
    -- Not approved: the service classifies payment.failure and records it on the attempt.
    return pg_catalog.jsonb_build_object('matched', 'attempt', 'attemptId', a.id, 'attemptStatus', a.status,
                                         'action', case when v.status in ('ABORTED', 'EXPIRED')
                                                        then 'classify_failure' else 'none' end,
                                         'failure', payment -> 'failure');
  end if;
  select * into pay from billing.payments p where p.payment_key = v.payment_key;
  if found then
    return pg_catalog.jsonb_build_object('matched', 'payment') || billing.sync_payment(pay.id, payment);
  end if;
  if v.status not in ('DONE', 'CANCELED', 'PARTIAL_CANCELED') or v.approved_at is null then
    return pg_catalog.jsonb_build_object('matched', 'none', 'action', 'none');
  end if;
  -- Approved at Toss under an orderId that is not ours: keep it so the ledger is complete.
  insert into billing.payments (payment_key, order_id, applied, status, method, total_amount, balance_amount,
                                approved_at, secret, receipt_url, last_transaction_key, raw)
  values (v.payment_key, v.order_id, false, v.status, v.method, v.total_amount, v.total_amount, v.approved_at,
          v.secret, v.receipt_url, v.last_transaction_key, payment)
  returning * into pay;
  perform billing.raise_alert('payment with an unknown orderId', 'payments', pay.id,
                              pg_catalog.jsonb_build_object('orderId', v.order_id, 'amount', v.total_amount));
  return pg_catalog.jsonb_build_object('matched', 'none', 'action', 'recorded_unmatched')
         || billing.sync_payment(pay.id, payment);
end
$$;
revoke execute on function billing.service_apply_payment_snapshot(jsonb) from public;
grant execute on function billing.service_apply_payment_snapshot(jsonb) to billing_service;
comment on function billing.service_apply_payment_snapshot(jsonb) is
  'Service: applies a Payment fetched from Toss with the secret key (after a webhook, a lookup or '
  'reconciliation). Approved payments of our orders are recorded as charge successes (resolving '
  'unknown attempts); known payments get the newer snapshot (older ones are ignored) and their '
  'cancels[] become refunds; approved payments with an unknown orderId are recorded unapplied with '
  'an alert. Converges under duplicate and out-of-order deliveries. billing_service only. Raises '
  'SB400 (malformed payment), SB409 (conflicting payment for an attempt).';

-- ---------------------------------------------------------------------------------------------
-- Refunds
-- ---------------------------------------------------------------------------------------------
create function billing.service_claim_refunds(worker text, batch integer default 10,
                                              lease interval default interval '2 minutes')
returns table (refund_id uuid, idempotency_key uuid, payment_key text, cancel_amount bigint, cancel_reason text,
               balance_amount bigint, lease_expires_at timestamptz)
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
           lease_expires_at = v_now + lease, attempts = r.attempts + 1
      from picked
     where r.id = picked.id
    returning r.*
  )
  select c.id, c.id, p.payment_key, c.amount, c.reason, p.balance_amount, c.lease_expires_at
    from claimed c
    join billing.payments p on p.id = c.payment_id
   order by c.not_before, c.id;
end
$$;
revoke execute on function billing.service_claim_refunds(text, integer, interval) from public;
grant execute on function billing.service_claim_refunds(text, integer, interval) to billing_service;
comment on function billing.service_claim_refunds(text, integer, interval) is
  'Service: claims up to batch requested refunds (FOR UPDATE SKIP LOCKED) under a lease; call POST '
  '/v1/payments/{paymentKey}/cancel with Idempotency-Key = idempotency_key (the refund id) and '
  'cancelAmount. billing_service only. Raises SB400 (bad worker/batch/lease).';

create function billing.service_record_refund_result(refund_id uuid, payment jsonb default null,
                                                     error_code text default null, error_message text default null,
                                                     retryable boolean default false)
returns jsonb
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
  select * into r from billing.refunds x where x.id = service_record_refund_result.refund_id;
  if not found then
    raise exception 'refund % not found', refund_id using errcode = 'SB404';
  end if;
  select * into strict pay from billing.payments p where p.id = r.payment_id for update;
  select * into strict r from billing.refunds x where x.id = r.id for update;

  if payment is not null then
    select * into v from billing.parse_payment(payment);
    if v.payment_key <> pay.payment_key then
      raise exception 'refund % is for payment %, not %', r.id, pay.payment_key, v.payment_key using errcode = 'SB400';
    end if;
    if r.status <> 'succeeded' then
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
       where x.id = r.id and x.status in ('requested', 'claimed', 'failed')
      returning * into r;
      v_sync := billing.sync_payment(pay.id, payment);
      return pg_catalog.jsonb_build_object('refundId', r.id, 'status', r.status, 'changed', true, 'sync', v_sync);
    end if;
    v_sync := billing.sync_payment(pay.id, payment);
    return pg_catalog.jsonb_build_object('refundId', r.id, 'status', r.status, 'changed', false, 'sync', v_sync);
  end if;

  if r.status = 'failed' and r.error_code = service_record_refund_result.error_code then
    return pg_catalog.jsonb_build_object('refundId', r.id, 'status', r.status, 'changed', false);
  end if;
  if r.status = 'requested' and retryable then
    return pg_catalog.jsonb_build_object('refundId', r.id, 'status', r.status, 'changed', false);
  end if;
  if retryable and r.attempts < 10 then
    update billing.refunds x
       set status = 'requested', status_reason = 'retry after ' || service_record_refund_result.error_code,
           lease_owner = null, lease_expires_at = null,
           not_before = v_now + billing.backoff(x.attempts, interval '1 minute', interval '1 hour'),
           error_code = service_record_refund_result.error_code, error_message = service_record_refund_result.error_message
     where x.id = r.id and x.status = 'claimed'
    returning * into r;
  else
    update billing.refunds x
       set status = 'failed', status_reason = 'failed: ' || service_record_refund_result.error_code,
           lease_owner = null, lease_expires_at = null,
           error_code = service_record_refund_result.error_code, error_message = service_record_refund_result.error_message
     where x.id = r.id and x.status in ('claimed', 'requested')
    returning * into r;
    if found then
      perform billing.raise_alert('refund failed', 'refunds', r.id,
        pg_catalog.jsonb_build_object('code', r.error_code, 'message', r.error_message, 'amount', r.amount));
    end if;
  end if;
  if not found then
    raise exception 'refund % is % and cannot record error %', refund_id,
      (select x.status from billing.refunds x where x.id = service_record_refund_result.refund_id), error_code
      using errcode = 'SB409';
  end if;
  return pg_catalog.jsonb_build_object('refundId', r.id, 'status', r.status, 'changed', true);
end
$$;
revoke execute on function billing.service_record_refund_result(uuid, jsonb, text, text, boolean) from public;
grant execute on function billing.service_record_refund_result(uuid, jsonb, text, text, boolean) to billing_service;
comment on function billing.service_record_refund_result(uuid, jsonb, text, text, boolean) is
  'Service: records the outcome of a cancel call: the Payment it returned (the refund takes its cancel '
  'from cancels[]; the payment snapshot is applied; credits are revoked when balanceAmount reaches 0) '
  'or an error (retryable: requested again with backoff and the same Idempotency-Key, up to 10 '
  'tries; else failed with an operator alert). Idempotent. billing_service only. Raises SB400 (bad '
  'input, other payment), SB404 (unknown refund), SB409 (already resolved otherwise), SB422 (the '
  'payment shows no matching cancel).';

-- ---------------------------------------------------------------------------------------------
-- Webhooks
-- ---------------------------------------------------------------------------------------------
create function billing.service_ingest_webhook(transmission_id text, event_type text, payload jsonb,
                                               headers jsonb default '{}')
returns table (webhook_event_id uuid, status text, resolved_event_type text, duplicate boolean)
language plpgsql
security definer
set search_path = ''
as $$
declare
  w billing.webhook_events;
  v_type text := coalesce(nullif(service_ingest_webhook.event_type, ''), payload ->> 'eventType');
  v_payload jsonb := payload;
  v_status billing.webhook_status := 'received';
  v_reason text := 'stored';
  v_key text;
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
    -- Never store a billing key in the clear: keep only its sha256, which finds the payment method.
    v_key := v_payload -> 'data' ->> 'billingKey';
    if v_key is not null then
      v_payload := pg_catalog.jsonb_set(v_payload #- '{data,billingKey}', '{data,billingKeySha256}',
        pg_catalog.to_jsonb(pg_catalog.encode(extensions.digest(pg_catalog.convert_to(v_key, 'UTF8'), 'sha256'), 'hex')));
    end if;
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
  values (transmission_id, v_type, v_payload, coalesce(headers, '{}'), v_status, v_reason,
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
revoke execute on function billing.service_ingest_webhook(text, text, jsonb, jsonb) from public;
grant execute on function billing.service_ingest_webhook(text, text, jsonb, jsonb) to billing_service;
comment on function billing.service_ingest_webhook(text, text, jsonb, jsonb) is
  'Service: stores a Toss webhook before anything else (answer 200 after this). A repeated '
  'transmission id returns the stored row with duplicate = true. BILLING_DELETED keeps only the '
  'billing key''s sha256; DEPOSIT_CALLBACK (flat body) is ignored unless its secret matches a stored '
  'payment; PAYMENT_STATUS_CHANGED is ignored when its data.secret differs from the stored payment''s; '
  'unknown event types are stored as ignored. billing_service only. Raises SB400 (bad input).';

create function billing.service_claim_webhooks(worker text, batch integer default 10,
                                               lease interval default interval '2 minutes')
returns table (webhook_event_id uuid, transmission_id text, event_type text, payload jsonb, headers jsonb,
               attempts integer, lease_expires_at timestamptz)
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
         lease_expires_at = v_now + lease, attempts = we.attempts + 1
    from picked
   where we.id = picked.id
  returning we.id, we.transmission_id, we.event_type, we.payload, we.headers, we.attempts, we.lease_expires_at;
end
$$;
revoke execute on function billing.service_claim_webhooks(text, integer, interval) from public;
grant execute on function billing.service_claim_webhooks(text, integer, interval) to billing_service;
comment on function billing.service_claim_webhooks(text, integer, interval) is
  'Service: claims up to batch stored webhooks for processing (FOR UPDATE SKIP LOCKED) under a '
  'lease. PAYMENT_STATUS_CHANGED: re-fetch the payment (GET /v1/payments/{paymentKey}) and call '
  'service_apply_payment_snapshot; DEPOSIT_CALLBACK (secret already matched): re-fetch by orderId '
  'and do the same; BILLING_DELETED: service_mark_payment_method_deleted. Finish each with '
  'service_record_webhook_result. billing_service only. Raises SB400.';

create function billing.service_record_webhook_result(webhook_event_id uuid, outcome text, error text default null)
returns jsonb
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
  if w.status::text = outcome or (outcome = 'retry' and w.status = 'received') then
    return pg_catalog.jsonb_build_object('webhookEventId', w.id, 'status', w.status, 'changed', false);
  end if;
  if outcome = 'retry' and w.attempts < 10 then
    update billing.webhook_events we
       set status = 'received', status_reason = 'retry: ' || coalesce(error, 'no detail'), last_error = error,
           lease_owner = null, lease_expires_at = null,
           not_before = v_now + billing.backoff(we.attempts, interval '1 minute', interval '1 hour')
     where we.id = w.id and we.status = 'processing'
    returning * into w;
  else
    update billing.webhook_events we
       set status = case when outcome = 'retry' then 'failed'::billing.webhook_status else outcome::billing.webhook_status end,
           status_reason = coalesce(outcome || ': ' || error, outcome), last_error = coalesce(error, we.last_error),
           lease_owner = null, lease_expires_at = null, processed_at = v_now
     where we.id = w.id and we.status = 'processing'
    returning * into w;
    if found and w.status = 'failed' then
      perform billing.raise_alert('webhook processing failed', 'webhook_events', w.id,
        pg_catalog.jsonb_build_object('eventType', w.event_type, 'error', w.last_error, 'attempts', w.attempts));
    end if;
  end if;
  if not found then
    raise exception 'webhook event % is not being processed; cannot record %', webhook_event_id, outcome
      using errcode = 'SB409';
  end if;
  return pg_catalog.jsonb_build_object('webhookEventId', w.id, 'status', w.status, 'changed', true);
end
$$;
revoke execute on function billing.service_record_webhook_result(uuid, text, text) from public;
grant execute on function billing.service_record_webhook_result(uuid, text, text) to billing_service;
comment on function billing.service_record_webhook_result(uuid, text, text) is
  'Service: finishes a claimed webhook: processed, ignored, failed (operator alert) or retry '
  '(received again after a backoff; failed after 10 tries). Repeating a result changes nothing. '
  'billing_service only. Raises SB400 (bad outcome), SB404 (unknown event), SB409 (not processing).';

create function billing.service_mark_payment_method_deleted(billing_key_sha256 text, reason text)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  pm billing.payment_methods;
  s billing.subscriptions;
  v_now timestamptz := billing.now();
begin
  if billing_key_sha256 is null or billing_key_sha256 !~ '^[0-9a-f]{64}$' then
    raise exception 'billing_key_sha256 must be 64 lowercase hex digits' using errcode = 'SB400';
  end if;
  if pg_catalog.length(reason) > 200 then
    raise exception 'reason must be at most 200 characters' using errcode = 'SB400';
  end if;
  select * into pm from billing.payment_methods x where x.billing_key_sha256 = service_mark_payment_method_deleted.billing_key_sha256;
  if not found then
    -- Keys issued for registrations that never completed are not ours to track.
    return pg_catalog.jsonb_build_object('found', false, 'changed', false);
  end if;
  select * into s from billing.subscriptions su
   where su.payment_method_id = pm.id and su.status in ('incomplete', 'active', 'past_due') for update;
  select * into strict pm from billing.payment_methods x where x.id = pm.id for update;
  if pm.status = 'deleted' then
    return pg_catalog.jsonb_build_object('found', true, 'changed', false, 'paymentMethodId', pm.id);
  end if;
  update billing.payment_methods x
     set status = 'deleted', deleted_at = v_now,
         status_reason = 'deleted at Toss: ' || coalesce(nullif(reason, ''), 'no reason given')
   where x.id = pm.id and x.status in ('active', 'replaced');
  update billing.key_deletions kd
     set status = 'deleted', deleted_at = v_now, status_reason = 'deleted at Toss (BILLING_DELETED)',
         lease_owner = null, lease_expires_at = null
   where kd.payment_method_id = pm.id and kd.status in ('requested', 'claimed', 'failed');
  -- Unsent attempts on a dead key would only fail.
  update billing.charge_attempts ca
     set status = 'canceled', status_reason = 'billing key deleted at Toss', resolved_at = v_now
   where ca.payment_method_id = pm.id and ca.status = 'queued' and ca.sends = 0;
  if s.id is not null then
    update billing.subscriptions su
       set awaiting_card = true, status_reason = 'billing key deleted at Toss'
     where su.id = s.id;
    -- An active subscription whose renewal was waiting on this key has nothing left to pay its
    -- period with: past_due with grace, as when a renewal finds no usable card (billing.tick).
    -- A charge already sent on the key settles it instead.
    if s.status = 'active'
       and exists (select 1 from billing.billing_periods bp where bp.id = s.current_period_id and bp.status = 'open')
       and not exists (select 1 from billing.charge_attempts ca
                        where ca.period_id = s.current_period_id and ca.status in ('queued', 'claimed', 'unknown')) then
      perform billing.mark_past_due(s.id, 'billing key deleted at Toss', awaiting_card => true);
    end if;
    perform billing.notify_subscriber('card_needed', s.id,
      pg_catalog.jsonb_build_object('reason', 'billing key deleted', 'paymentMethodId', pm.id));
  end if;
  return pg_catalog.jsonb_build_object('found', true, 'changed', true, 'paymentMethodId', pm.id,
                                       'subscriptionId', s.id);
end
$$;
revoke execute on function billing.service_mark_payment_method_deleted(text, text) from public;
grant execute on function billing.service_mark_payment_method_deleted(text, text) to billing_service;
comment on function billing.service_mark_payment_method_deleted(text, text) is
  'Service: a BILLING_DELETED webhook named this billing key (by sha256): the payment method is '
  'deleted, its pending deletion is done, unsent attempts on it are withdrawn and a live '
  'subscription using it waits for a new card (card_needed; past_due when its current period is '
  'unpaid and nothing is in flight). Unknown keys are a no-op. Idempotent. '
  'billing_service only. Raises SB400 (bad sha256 or reason).';

-- ---------------------------------------------------------------------------------------------
-- Billing-key deletion at Toss
-- ---------------------------------------------------------------------------------------------
create function billing.service_claim_key_deletions(worker text, batch integer default 10,
                                                    lease interval default interval '2 minutes')
returns table (key_deletion_id uuid, payment_method_id uuid, customer_key text, billing_key_ciphertext bytea,
               billing_key_key_id text, lease_expires_at timestamptz)
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
           lease_expires_at = v_now + lease, attempts = kd.attempts + 1
      from picked
     where kd.id = picked.id
    returning kd.*
  )
  select c.id, c.payment_method_id, pm.customer_key, pm.billing_key_ciphertext, pm.billing_key_key_id,
         c.lease_expires_at
    from claimed c
    join billing.payment_methods pm on pm.id = c.payment_method_id
   order by c.not_before, c.id;
end
$$;
revoke execute on function billing.service_claim_key_deletions(text, integer, interval) from public;
grant execute on function billing.service_claim_key_deletions(text, integer, interval) to billing_service;
comment on function billing.service_claim_key_deletions(text, integer, interval) is
  'Service: claims up to batch billing keys to delete at Toss (DELETE /v1/billing/{billingKey}) under '
  'a lease, skipping keys with charges still in flight. billing_service only. Raises SB400.';

create function billing.service_record_key_deleted(key_deletion_id uuid, error_code text default null,
                                                   error_message text default null)
returns jsonb
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
    if kd.status = 'deleted' then
      return pg_catalog.jsonb_build_object('keyDeletionId', kd.id, 'status', kd.status, 'changed', false);
    end if;
    update billing.key_deletions x
       set status = 'deleted', status_reason = 'deleted at Toss', deleted_at = v_now, lease_owner = null,
           lease_expires_at = null
     where x.id = kd.id and x.status in ('claimed', 'requested', 'failed')
    returning * into kd;
    update billing.payment_methods pm
       set status = 'deleted', status_reason = 'billing key deleted at Toss', deleted_at = v_now
     where pm.id = kd.payment_method_id and pm.status <> 'deleted';
    return pg_catalog.jsonb_build_object('keyDeletionId', kd.id, 'status', kd.status, 'changed', true);
  end if;
  if kd.status in ('requested', 'failed') and kd.error_code is not distinct from error_code then
    return pg_catalog.jsonb_build_object('keyDeletionId', kd.id, 'status', kd.status, 'changed', false);
  end if;
  update billing.key_deletions x
     set status = case when x.attempts < 8 then 'requested'::billing.key_deletion_status else 'failed' end,
         status_reason = 'error: ' || service_record_key_deleted.error_code,
         not_before = v_now + billing.backoff(x.attempts, interval '5 minutes', interval '6 hours'),
         lease_owner = null, lease_expires_at = null,
         error_code = service_record_key_deleted.error_code, error_message = service_record_key_deleted.error_message
   where x.id = kd.id and x.status = 'claimed'
  returning * into kd;
  if not found then
    raise exception 'key deletion % is not claimed; cannot record error %', key_deletion_id, error_code
      using errcode = 'SB409';
  end if;
  if kd.status = 'failed' then
    perform billing.raise_alert('billing key deletion failed', 'key_deletions', kd.id,
      pg_catalog.jsonb_build_object('code', kd.error_code, 'message', kd.error_message));
  end if;
  return pg_catalog.jsonb_build_object('keyDeletionId', kd.id, 'status', kd.status, 'changed', true);
end
$$;
revoke execute on function billing.service_record_key_deleted(uuid, text, text) from public;
grant execute on function billing.service_record_key_deleted(uuid, text, text) to billing_service;
comment on function billing.service_record_key_deleted(uuid, text, text) is
  'Service: records the DELETE of a billing key at Toss: without error_code it is deleted (map '
  'already-gone codes such as NOT_FOUND_BILLING to success); with one it is retried with backoff, '
  'failed after 8 tries with an operator alert. Idempotent. billing_service only. Raises SB400, '
  'SB404 (unknown deletion), SB409 (not claimed).';

-- ---------------------------------------------------------------------------------------------
-- Notification outbox
-- ---------------------------------------------------------------------------------------------
create function billing.service_claim_notifications(worker text, batch integer default 10,
                                                    lease interval default interval '2 minutes')
returns table (notification_id bigint, kind text, user_id text, customer_email text, customer_name text,
               subscription_id uuid, payload jsonb, created_at timestamptz, lease_expires_at timestamptz)
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
       set lease_owner = worker, lease_expires_at = v_now + lease, attempts = n.attempts + 1
      from picked
     where n.id = picked.id
    returning n.*
  )
  select c.id, c.kind::text, c.user_id, cu.email, cu.name, c.subscription_id, c.payload, c.created_at,
         c.lease_expires_at
    from claimed c
    left join billing.customers cu on cu.id = c.customer_id
   order by c.id;
end
$$;
revoke execute on function billing.service_claim_notifications(text, integer, interval) from public;
grant execute on function billing.service_claim_notifications(text, integer, interval) to billing_service;
comment on function billing.service_claim_notifications(text, integer, interval) is
  'Service: claims up to batch undelivered notifications (oldest first, FOR UPDATE SKIP LOCKED) '
  'under a lease; an expired lease makes one claimable again. billing_service only. Raises SB400.';

create function billing.service_record_notification_delivered(notification_id bigint)
returns boolean
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_delivered timestamptz;
begin
  select n.delivered_at into v_delivered
    from billing.notifications n where n.id = service_record_notification_delivered.notification_id for update;
  if not found then
    raise exception 'notification % not found', notification_id using errcode = 'SB404';
  end if;
  if v_delivered is not null then
    return false;
  end if;
  update billing.notifications n
     set delivered_at = billing.now(), lease_owner = null, lease_expires_at = null
   where n.id = service_record_notification_delivered.notification_id and n.delivered_at is null;
  return true;
end
$$;
revoke execute on function billing.service_record_notification_delivered(bigint) from public;
grant execute on function billing.service_record_notification_delivered(bigint) to billing_service;
comment on function billing.service_record_notification_delivered(bigint) is
  'Service: marks a notification delivered; true the first time, false when it already was. '
  'billing_service only. Raises SB404 (unknown notification).';
