-- An empty eventType in the payload counts as no event type, as an empty event_type argument
-- already did: the call then fails with SB400 (bad input) before anything is stored, instead of
-- reaching the table's check constraint (SQLSTATE 23514).

create or replace function billing.service_ingest_webhook(transmission_id text, event_type text, payload jsonb,
                                               headers jsonb default '{}')
returns table (webhook_event_id uuid, status text, resolved_event_type text, duplicate boolean)
language plpgsql
security definer
set search_path = ''
as $$
declare
  w billing.webhook_events;
  v_type text := coalesce(nullif(service_ingest_webhook.event_type, ''), nullif(payload ->> 'eventType', ''));
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
revoke execute on function billing.service_ingest_webhook(text, text, jsonb, jsonb) from public;
grant execute on function billing.service_ingest_webhook(text, text, jsonb, jsonb) to billing_service;
comment on function billing.service_ingest_webhook(text, text, jsonb, jsonb) is
  'Service: stores a Toss webhook before anything else (answer 200 after this). A repeated '
  'transmission id returns the stored row with duplicate = true. Any billingKey in the payload is '
  'stored only as its sha256 (billingKeySha256), and only allow-listed headers are kept '
  '(billing.webhook_headers). DEPOSIT_CALLBACK (flat body) is ignored unless its secret matches a '
  'stored payment; PAYMENT_STATUS_CHANGED is ignored when its data.secret differs from the stored '
  'payment''s; unknown event types are stored as ignored. billing_service only. Raises SB400 (bad input, '
  'such as no event type or an empty one).';
