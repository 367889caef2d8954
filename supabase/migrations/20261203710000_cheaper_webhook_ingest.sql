-- Storing a webhook without walking it.
--
-- billing.redact_billing_keys called itself once per member at every depth, a plpgsql call each:
-- a PAYMENT_STATUS_CHANGED carries a whole Payment (card, receipt, cancels...), so storing one
-- cost about a hundred calls although almost none holds a billing key. A subtree whose text has no
-- "billingKey" member is now returned as it is. Every member named billingKey is rendered in the
-- text as "billingKey" (with its quotes), while a quote inside a string value is escaped, so the
-- test never misses one; a string value that is exactly "billingKey" only takes the long way.

create or replace function billing.redact_billing_keys(doc jsonb)
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
  if doc is null or pg_catalog.jsonb_typeof(doc) not in ('object', 'array')
     or pg_catalog.strpos(doc::text, '"billingKey"') = 0 then
    return doc;
  end if;
  if pg_catalog.jsonb_typeof(doc) = 'object' then
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
  end if;
  select coalesce(pg_catalog.jsonb_agg(billing.redact_billing_keys(e.value) order by e.n), '[]'::jsonb)
    into v_out
    from pg_catalog.jsonb_array_elements(doc) with ordinality as e(value, n);
  return v_out;
end
$$;
revoke execute on function billing.redact_billing_keys(jsonb) from public;
comment on function billing.redact_billing_keys(jsonb) is
  'A JSON document with every "billingKey" member, at any depth, replaced by "billingKeySha256" '
  '(lowercase hex sha256 of the UTF-8 key); a document without one is returned as it is, unwalked. '
  'Owner only. Raises nothing.';

select billing.assert_surface_locked_down();
