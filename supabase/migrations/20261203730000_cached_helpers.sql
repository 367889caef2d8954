-- The small helpers every charge, renewal and audit event calls, in plpgsql.
--
-- A SQL function with a SET clause is never inlined, and its body is parsed and planned again for
-- every statement (or, called from plpgsql, every transaction) that calls it: about 20 µs a call.
-- billing.now() alone was called a dozen times per recorded charge (each event's occurred_at, each
-- status change), billing.actor_role() and billing.jwt_sub() once per audit trigger. plpgsql keeps
-- a function's plans for the session, so the same bodies cost a few µs. Same signatures,
-- attributes, results and search_path; privileges and comments are kept by create or replace.

create or replace function billing.now()
returns timestamptz
language plpgsql
stable
parallel safe
set search_path = ''
as $$
begin
  return (select case when c.enabled then coalesce(c.frozen_at, pg_catalog.now() + c.clock_offset)
                      else pg_catalog.now() end
            from billing.clock c
           where c.singleton);
end
$$;
revoke execute on function billing.now() from public;
comment on function billing.now() is
  'The one clock of all billing logic: transaction time, or the test clock when it is enabled. '
  'Owner only (used inside billing functions). Raises nothing.';

create or replace function billing.actor_role()
returns text
language plpgsql
stable
set search_path = ''
as $$
begin
  return coalesce(nullif(pg_catalog.current_setting('role', true), 'none'), pg_catalog.session_user()::text);
end
$$;
revoke execute on function billing.actor_role() from public;
comment on function billing.actor_role() is
  'Who is calling: the SET ROLE of the session (as PostgREST sets it), else the login user. Owner only. Raises nothing.';

create or replace function billing.jwt_sub()
returns text
language plpgsql
stable
set search_path = ''
as $$
begin
  return nullif(auth.jwt() ->> 'sub', '');
end
$$;
revoke execute on function billing.jwt_sub() from public;
comment on function billing.jwt_sub() is
  'The JWT "sub" of the request (Supabase Auth or a third-party JWT), or null. Owner only. Raises nothing.';

create or replace function billing.period_start(anchor timestamptz, n integer)
returns timestamptz
language plpgsql
immutable
strict
parallel safe
set search_path = ''
as $$
begin
  return pg_catalog.timezone('Asia/Seoul',
           pg_catalog.timezone('Asia/Seoul', anchor) + pg_catalog.make_interval(months => n));
end
$$;
revoke execute on function billing.period_start(timestamptz, integer) from public;
comment on function billing.period_start(timestamptz, integer) is
  'Start of the billing period after n whole calendar months from anchor, in Asia/Seoul, clamped '
  'to month end (period k covers [period_start(anchor, k-1), period_start(anchor, k))). '
  'Owner only. Raises nothing.';

create or replace function billing.add_local(at timestamptz, step interval)
returns timestamptz
language plpgsql
immutable
strict
parallel safe
set search_path = ''
as $$
begin
  return pg_catalog.timezone('Asia/Seoul', pg_catalog.timezone('Asia/Seoul', at) + step);
end
$$;
revoke execute on function billing.add_local(timestamptz, interval) from public;
comment on function billing.add_local(timestamptz, interval) is
  'at + step computed on the Asia/Seoul calendar. Owner only. Raises nothing.';

create or replace function billing.backoff(n integer, base interval, cap interval)
returns interval
language plpgsql
immutable
strict
parallel safe
set search_path = ''
as $$
begin
  return least(cap, base * pg_catalog.power(2, least(greatest(n - 1, 0), 20))::double precision);
end
$$;
revoke execute on function billing.backoff(integer, interval, interval) from public;
comment on function billing.backoff(integer, interval, interval) is
  'Exponential backoff: base * 2^(n-1), at most cap. Owner only. Raises nothing.';

create or replace function billing.order_name(plan_name text, starts_at timestamptz, ends_at timestamptz)
returns text
language plpgsql
stable
set search_path = ''
as $$
begin
  return pg_catalog.left(plan_name || ' '
           || pg_catalog.to_char(pg_catalog.timezone('Asia/Seoul', starts_at), 'YYYY.MM.DD') || '~'
           || pg_catalog.to_char(pg_catalog.timezone('Asia/Seoul', ends_at) - interval '1 day', 'YYYY.MM.DD'),
         100);
end
$$;
revoke execute on function billing.order_name(text, timestamptz, timestamptz) from public;
comment on function billing.order_name(text, timestamptz, timestamptz) is
  'The Toss orderName of a period''s charge, at most 100 characters. Owner only. Raises nothing.';

create or replace function billing.payment_cancels(payment jsonb)
returns jsonb
language plpgsql
immutable
set search_path = ''
as $$
begin
  return case when pg_catalog.jsonb_typeof(payment -> 'cancels') = 'array' then payment -> 'cancels'
              else '[]'::jsonb end;
end
$$;
revoke execute on function billing.payment_cancels(jsonb) from public;
comment on function billing.payment_cancels(jsonb) is
  'A Toss Payment''s cancels[] as a JSON array (empty when null or absent). Owner only. Raises nothing.';

create or replace function billing.cancel_count(payment jsonb)
returns integer
language plpgsql
immutable
set search_path = ''
as $$
begin
  return pg_catalog.jsonb_array_length(billing.payment_cancels(payment));
end
$$;
revoke execute on function billing.cancel_count(jsonb) from public;
comment on function billing.cancel_count(jsonb) is
  'Number of entries in a Toss Payment''s cancels[]. Owner only. Raises nothing.';

create or replace function billing.recorded_of(id text, status text, changed boolean, detail jsonb default '{}')
returns billing.recorded
language plpgsql
immutable
set search_path = ''
as $$
begin
  return row(id, status, changed, coalesce(detail, '{}'::jsonb))::billing.recorded;
end
$$;
revoke execute on function billing.recorded_of(text, text, boolean, jsonb) from public;
comment on function billing.recorded_of(text, text, boolean, jsonb) is
  'Builds a billing.recorded. Owner only. Raises nothing.';

create or replace function billing.attempt_recorded(a billing.charge_attempts, changed boolean,
                                                    detail jsonb default '{}')
returns billing.recorded
language plpgsql
immutable
set search_path = ''
as $$
begin
  return billing.recorded_of(a.id::text, a.status::text, changed,
                             pg_catalog.jsonb_build_object('notBefore', a.not_before, 'orderId', a.order_id,
                                                           'classification', a.classification)
                             || coalesce(detail, '{}'::jsonb));
end
$$;
revoke execute on function billing.attempt_recorded(billing.charge_attempts, boolean, jsonb) from public;
comment on function billing.attempt_recorded(billing.charge_attempts, boolean, jsonb) is
  'The billing.recorded of a charge attempt (detail: notBefore, orderId, classification, extra). '
  'Owner only. Raises nothing.';

create or replace function billing.new_order_id()
returns text
language plpgsql
volatile
set search_path = ''
as $$
begin
  return 'ord_' || pg_catalog.encode(extensions.gen_random_bytes(16), 'hex');
end
$$;
revoke execute on function billing.new_order_id() from public;
comment on function billing.new_order_id() is
  'A fresh Toss orderId (36 characters of ^[A-Za-z0-9_-]). Owner only. Raises nothing.';

create or replace function billing.webhook_headers(headers jsonb)
returns jsonb
language plpgsql
immutable
set search_path = ''
as $$
begin
  return (select coalesce(pg_catalog.jsonb_object_agg(pg_catalog.lower(h.key), h.value), '{}'::jsonb)
            from pg_catalog.jsonb_each(case when pg_catalog.jsonb_typeof(headers) = 'object' then headers
                                            else '{}' end) h
           where pg_catalog.lower(h.key) in ('tosspayments-webhook-transmission-id',
                                             'tosspayments-webhook-transmission-time',
                                             'tosspayments-webhook-transmission-retried-count',
                                             'tosspayments-webhook-signature',
                                             'content-type', 'user-agent')
             and pg_catalog.jsonb_typeof(h.value) = 'string'
             and pg_catalog.length(h.value #>> '{}') <= 500);
end
$$;
revoke execute on function billing.webhook_headers(jsonb) from public;
comment on function billing.webhook_headers(jsonb) is
  'The request headers worth keeping with a webhook: Toss''s transmission headers, content type and '
  'user agent (names lowercased, string values up to 500 characters); Authorization, cookies and '
  'anything else are dropped. Owner only. Raises nothing.';

select billing.assert_surface_locked_down();
