-- Security fixes found by the security suite (tests/security).
--
-- The success redirect is reachable by anyone: before this, the service called Toss's billing-key
-- issue for whatever customerKey and authKey a request carried, spending the merchant's Toss rate
-- limit on strangers' requests. The service now asks the database first whether the registration
-- can still be completed, and calls Toss only then.

create function billing.service_check_registration(customer_key text)
returns text
language plpgsql
stable
security definer
set search_path = ''
as $$
declare
  r billing.card_registrations;
begin
  if customer_key is null or pg_catalog.length(customer_key) not between 2 and 50 then
    raise exception 'customer_key must be 2–50 characters' using errcode = 'SB400';
  end if;
  select * into r from billing.card_registrations cr
   where cr.customer_key = service_check_registration.customer_key;
  if not found then
    raise exception 'registration with customer key % not found', customer_key using errcode = 'SB404';
  end if;
  -- A completed one answers too: a retried redirect re-issues under the same Idempotency-Key and
  -- service_complete_registration recognises its own billing key (a replay).
  if r.status = 'completed' then
    return 'completed';
  end if;
  if r.status <> 'pending' then
    raise exception 'registration % is %, not pending', r.id, r.status using errcode = 'SB409';
  end if;
  if r.expires_at <= billing.now() then
    raise exception 'registration % expired at %', r.id, r.expires_at using errcode = 'SB409';
  end if;
  return 'pending';
end
$$;
revoke execute on function billing.service_check_registration(text) from public;
grant execute on function billing.service_check_registration(text) to billing_service;
comment on function billing.service_check_registration(text) is
  'Service: whether the registration of this customerKey can be completed, before Toss is asked to '
  'issue a billing key: ''pending'', or ''completed'' (a retried redirect). Changes nothing. '
  'Raises SB400 (customer_key not 2–50 characters), SB404 (no such registration), SB409 (failed, '
  'expired or otherwise not pending).';

select billing.assert_surface_locked_down();
