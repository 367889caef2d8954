-- Subscribers' errors arrive through the Data API with a meaningful HTTP status.
--
-- PostgREST answers an SQLSTATE it does not know (SB400..SB422) with HTTP 400. Its documented way
-- for a function to choose the status is RAISE SQLSTATE 'PGRST' with a JSON message (code,
-- message, details, hint) and a JSON detail (status, headers). So every api function keeps its
-- body unchanged, moved to the private schema api_impl, and api gets a thin wrapper with the same
-- signature, volatility, privileges and comment that calls it. Only inside a Data API request
-- (PostgREST sets request.method) does the wrapper turn an SBxxx error into PostgREST's error:
-- HTTP status xxx, JSON code still "SBxxx". SQL callers (tests, operators, the service) see the
-- SBxxx SQLSTATEs exactly as before, and no billing.service_* function is touched.
--
-- A later migration that redefines an api function must define it in api_impl (keeping the
-- wrapper); a test checks that every api function is such a wrapper.

create schema api_impl;
revoke all on schema api_impl from public;
comment on schema api_impl is
  'Bodies of the subscriber functions in api; reached only through their api wrappers.';

create function api_impl.raise_http_error(code text, message text, details text, hint text)
returns void
language plpgsql
set search_path = ''
as $$
begin
  raise sqlstate 'PGRST' using
    message = pg_catalog.jsonb_build_object('code', code, 'message', message,
                                            'details', nullif(details, ''),
                                            'hint', nullif(hint, ''))::text,
    detail = pg_catalog.jsonb_build_object('status', pg_catalog.substr(code, 3)::int,
                                           'headers', '{}'::jsonb)::text;
end
$$;
revoke execute on function api_impl.raise_http_error(text, text, text, text) from public;
comment on function api_impl.raise_http_error(text, text, text, text) is
  'Raises an SBxxx error as PostgREST''s custom error: HTTP status xxx, JSON code SBxxx. Owner only.';

do $$
declare
  f record;
  v_call text;
  v_body text;
begin
  for f in
    select p.proname,
           pg_catalog.pg_get_function_arguments(p.oid) as args,
           pg_catalog.pg_get_function_identity_arguments(p.oid) as ident,
           pg_catalog.pg_get_function_result(p.oid) as result,
           p.proretset,
           case p.provolatile when 's' then 'stable' when 'i' then 'immutable' else 'volatile' end
             as volatility,
           coalesce(p.proargnames[1:p.pronargs], '{}') as argnames,
           pg_catalog.obj_description(p.oid, 'pg_proc') as description
      from pg_catalog.pg_proc p
     where p.pronamespace = 'api'::regnamespace
     order by p.proname
  loop
    execute pg_catalog.format('alter function api.%I(%s) set schema api_impl', f.proname, f.ident);
    execute pg_catalog.format('revoke all on function api_impl.%I(%s) from public, authenticated',
                              f.proname, f.ident);

    select pg_catalog.format('api_impl.%I(%s)', f.proname,
             coalesce(pg_catalog.string_agg(pg_catalog.format('%1$I => %1$I', n), ', '
                                            order by i), ''))
      into v_call
      from pg_catalog.unnest(f.argnames) with ordinality as a(n, i);

    v_body := pg_catalog.format($body$
declare
  v_detail text;
  v_hint text;
begin
  %s
exception when others then
  if sqlstate like 'SB4__' and coalesce(pg_catalog.current_setting('request.method', true), '') <> '' then
    get stacked diagnostics v_detail = pg_exception_detail, v_hint = pg_exception_hint;
    perform api_impl.raise_http_error(sqlstate, sqlerrm, v_detail, v_hint);
  end if;
  raise;
end
$body$, case when f.proretset then 'return query select * from ' || v_call || ';'
             else 'return ' || v_call || ';' end);

    execute pg_catalog.format(
      'create function api.%I(%s) returns %s language plpgsql %s security definer '
      'set search_path = '''' as %L',
      f.proname, f.args, f.result, f.volatility, v_body);
    execute pg_catalog.format('revoke execute on function api.%I(%s) from public',
                              f.proname, f.ident);
    execute pg_catalog.format('grant execute on function api.%I(%s) to authenticated',
                              f.proname, f.ident);
    execute pg_catalog.format('comment on function api.%I(%s) is %L', f.proname, f.ident,
                              f.description);
  end loop;
end
$$;

select billing.assert_surface_locked_down();
