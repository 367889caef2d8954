-- The scheduler: billing.tick(), run by pg_cron every minute, decides what is due; the doorbell
-- (pg_net) tells the service that work is waiting. The doorbell is only a hint: pg_net may lose
-- it, and the service also polls the claim functions. SQLSTATEs: see 20261121200100_billing_core.sql.

create function billing.ring_service(summary jsonb)
returns bigint
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_url text;
  v_token text;
  v_request bigint;
begin
  -- Secrets are read at run time; migrations never contain them.
  select ds.decrypted_secret into v_url from vault.decrypted_secrets ds where ds.name = 'saju_billing_service_url';
  select ds.decrypted_secret into v_token from vault.decrypted_secrets ds where ds.name = 'saju_billing_doorbell_token';
  if nullif(v_url, '') is null or nullif(v_token, '') is null then
    return null;  -- not configured: the service polls
  end if;
  begin
    v_request := net.http_post(
      url := pg_catalog.rtrim(v_url, '/') || '/internal/doorbell',
      body := coalesce(summary, '{}'::jsonb),
      headers := pg_catalog.jsonb_build_object('Content-Type', 'application/json',
                                               'Authorization', 'Bearer ' || v_token),
      timeout_milliseconds := 5000);
  exception when others then
    -- A doorbell that cannot ring must not undo the tick's work.
    perform billing.log_event('doorbell', null, 'doorbell_failed', sqlerrm, null);
    return null;
  end;
  return v_request;
end
$$;
revoke execute on function billing.ring_service(jsonb) from public;
comment on function billing.ring_service(jsonb) is
  'Rings the service''s doorbell (net.http_post to <vault saju_billing_service_url>/internal/doorbell '
  'with Bearer <vault saju_billing_doorbell_token>, 5 s timeout); returns the pg_net request id, or '
  'null when the secrets are absent or the request could not be queued. Owner only (called by '
  'billing.tick). Raises nothing.';

-- Hands the expired leases of one work queue back to it: rows in the leased status whose lease has
-- run out become ready again, due now, under the same keys (a refund's id is its Idempotency-Key),
-- at most max_rows of them, skipping rows locked elsewhere. Refunds, webhook events and key
-- deletions follow this one rule (only the table and its status names differ, hence dynamic SQL);
-- charge attempts have their own (re-send or look up), in billing.tick.
create function billing.expire_leases(queue regclass, leased_status text, ready_status text, max_rows integer)
returns integer
language plpgsql
set search_path = ''
as $$
declare
  v_count integer;
begin
  execute pg_catalog.format(
    'update %1$s q
        set status = %3$L, status_reason = ''lease of '' || q.lease_owner || '' expired'', lease_owner = null,
            lease_expires_at = null, not_before = $1
      where q.id in (select x.id from %1$s x
                      where x.status = %2$L and x.lease_expires_at <= $1
                      order by x.lease_expires_at limit $2 for update skip locked)',
    queue, leased_status, ready_status)
    using billing.now(), max_rows;
  get diagnostics v_count = row_count;
  return v_count;
end
$$;
revoke execute on function billing.expire_leases(regclass, text, text, integer) from public;
comment on function billing.expire_leases(regclass, text, text, integer) is
  'Returns up to max_rows rows of a work queue (refunds, webhook_events, key_deletions) whose lease '
  'expired from leased_status to ready_status, due now; returns how many. Owner only (called by '
  'billing.tick). Raises nothing of its own.';

create function billing.tick()
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_now timestamptz := billing.now();
  v_limit constant integer := 500;
  v_regs integer := 0;
  v_attempt_leases integer := 0;
  v_refund_leases integer := 0;
  v_webhook_leases integer := 0;
  v_key_leases integer := 0;
  v_renewed integer := 0;
  v_ended_at_period_end integer := 0;
  v_grace_ended integer := 0;
  v_credits integer := 0;
  v_card_needed integer := 0;
  s billing.subscriptions;
  pl billing.plans;
  p billing.billing_periods;
  v_id uuid;
  v_claimable jsonb;
  v_summary jsonb;
  v_request bigint;
begin
  -- pg_cron never overlaps a job with itself, but a manual call could.
  if not pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('saju-billing-tick')::bigint) then
    return pg_catalog.jsonb_build_object('at', v_now, 'skipped', true);
  end if;

  -- Registrations nobody completed in time.
  update billing.card_registrations cr
     set status = 'expired', status_reason = 'not completed before ' || cr.expires_at
   where cr.id in (select x.id from billing.card_registrations x
                    where x.status = 'pending' and x.expires_at <= v_now
                    order by x.expires_at limit v_limit for update skip locked);
  get diagnostics v_regs = row_count;

  -- Expired leases: the work becomes claimable again under the same keys. A charge is re-sent
  -- only while its period still needs paying; otherwise it is looked up.
  update billing.charge_attempts ca
     set status = case when ca.claim_mode = 'charge' and billing.resend_allowed(ca.id)
                       then 'queued'::billing.attempt_status else 'unknown' end,
         status_reason = 'lease of ' || ca.lease_owner || ' expired', claim_mode = null, lease_owner = null,
         lease_expires_at = null, not_before = v_now
   where ca.id in (select x.id from billing.charge_attempts x
                    where x.status = 'claimed' and x.lease_expires_at <= v_now
                    order by x.lease_expires_at limit v_limit for update skip locked);
  get diagnostics v_attempt_leases = row_count;

  v_refund_leases := billing.expire_leases('billing.refunds', 'claimed', 'requested', v_limit);
  v_webhook_leases := billing.expire_leases('billing.webhook_events', 'processing', 'received', v_limit);
  v_key_leases := billing.expire_leases('billing.key_deletions', 'claimed', 'requested', v_limit);

  -- Active subscriptions whose period has ended: end them (cancel at period end) or renew them.
  -- A period whose renewal charge is still pending is never renewed past: that would leave it open
  -- behind the next one and charge the next month before this one is settled (after a long outage,
  -- or a test clock moved by months, periods are caught up one at a time).
  for v_id in
    select su.id from billing.subscriptions su
     where su.status = 'active' and su.current_period_ends_at <= v_now
       and (su.cancel_at_period_end
            or not exists (select 1 from billing.billing_periods bp
                            where bp.id = su.current_period_id and bp.status = 'open'))
     order by su.current_period_ends_at
     limit v_limit
       for update skip locked
  loop
    select * into strict s from billing.subscriptions su where su.id = v_id;
    if s.cancel_at_period_end then
      perform billing.end_subscription(s.id, 'canceled', 'void', 'canceled at period end', s.current_period_ends_at);
      v_ended_at_period_end := v_ended_at_period_end + 1;
      continue;
    end if;
    p := billing.open_period(s.id, s.current_period_index + 1, 'renewal');
    if exists (select 1 from billing.payment_methods pm where pm.id = s.payment_method_id and pm.status = 'active') then
      perform billing.create_attempt(p.id, v_now, 'renewal of period ' || p.period_index);
    else
      -- The card is gone (deleted at Toss): no charge can work, so ask for a new one.
      perform billing.mark_past_due(s.id, 'renewal without a usable card', awaiting_card => true);
      perform billing.notify_subscriber('card_needed', s.id,
        pg_catalog.jsonb_build_object('reason', 'no usable card for the renewal', 'periodIndex', p.period_index));
      v_card_needed := v_card_needed + 1;
    end if;
    v_renewed := v_renewed + 1;
  end loop;

  -- Unpaid subscriptions whose grace is over and that have nothing left in flight.
  for v_id in
    select su.id from billing.subscriptions su
     where su.status in ('incomplete', 'past_due') and su.grace_ends_at <= v_now
       and not exists (select 1 from billing.charge_attempts ca
                        where ca.subscription_id = su.id and ca.status in ('queued', 'claimed', 'unknown'))
     order by su.grace_ends_at
     limit v_limit
       for update of su skip locked
  loop
    select * into strict s from billing.subscriptions su where su.id = v_id;
    select * into strict pl from billing.plans x where x.id = s.plan_id;
    if s.status = 'incomplete' then
      perform billing.end_subscription(s.id, 'canceled', 'void', 'first charge never succeeded');
    else
      perform billing.end_subscription(s.id, pl.dunning_final_status, 'unpaid', 'unpaid when the grace period ended');
    end if;
    v_grace_ended := v_grace_ended + 1;
  end loop;

  -- Credits expire at the end of their period.
  for v_id in
    select cg.id from billing.credit_grants cg
     where cg.status = 'active' and cg.expires_at <= v_now
     order by cg.expires_at
     limit v_limit
       for update skip locked
  loop
    perform billing.close_credit_grant(v_id, 'expired', 'period ended');
    v_credits := v_credits + 1;
  end loop;

  v_claimable := pg_catalog.jsonb_build_object(
    'attempts', exists (select 1 from billing.charge_attempts ca
                         where ca.status in ('queued', 'unknown') and ca.not_before <= v_now),
    'refunds', exists (select 1 from billing.refunds r where r.status = 'requested' and r.not_before <= v_now),
    'webhooks', exists (select 1 from billing.webhook_events we
                         where we.status = 'received' and we.not_before <= v_now),
    'keyDeletions', exists (select 1 from billing.key_deletions kd
                             where kd.status = 'requested' and kd.not_before <= v_now),
    'notifications', exists (select 1 from billing.notifications n
                              where n.delivered_at is null
                                and (n.lease_expires_at is null or n.lease_expires_at <= v_now)));
  v_summary := pg_catalog.jsonb_build_object(
    'at', v_now,
    'registrationsExpired', v_regs,
    'leasesExpired', pg_catalog.jsonb_build_object('attempts', v_attempt_leases, 'refunds', v_refund_leases,
                                                   'webhooks', v_webhook_leases, 'keyDeletions', v_key_leases),
    'renewals', v_renewed,
    'cardsNeeded', v_card_needed,
    'endedAtPeriodEnd', v_ended_at_period_end,
    'endedAfterGrace', v_grace_ended,
    'creditGrantsExpired', v_credits,
    'claimable', v_claimable);
  if v_claimable @> '{"attempts": true}' or v_claimable @> '{"refunds": true}'
     or v_claimable @> '{"webhooks": true}' or v_claimable @> '{"keyDeletions": true}'
     or v_claimable @> '{"notifications": true}' then
    v_request := billing.ring_service(v_summary);
  end if;
  return v_summary || pg_catalog.jsonb_build_object('doorbellRequestId', v_request);
end
$$;
revoke execute on function billing.tick() from public;
comment on function billing.tick() is
  'Scheduler (pg_cron, every minute): expires stale registrations, re-queues expired leases, ends '
  'subscriptions canceled at period end, renews due ones whose period is paid (new period + '
  'attempt), ends unpaid ones whose grace is over, expires credits, then rings the service only if '
  'claimable work exists. '
  'Each step walks a partial index on its due time and is bounded, so an idle tick is cheap. '
  'Returns a summary. Owner (postgres, the cron job''s user) only. Raises nothing of its own.';

-- Minute granularity and UTC only (pg_cron 1.4 locally, 1.6 on Supabase); the job calls one
-- function, so it is tested like any function. Scheduling the same name again updates it.
select cron.schedule('saju-billing-tick', '* * * * *', 'select billing.tick()');
