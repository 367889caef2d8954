-- Security: analyst access to analytics, and a check that the whole billing surface is locked down
-- the way the earlier migrations intend (the migration fails otherwise).

grant usage on schema analytics to analyst;
alter default privileges for role postgres in schema analytics grant select on tables to analyst;

-- A first read-only view; the analytics set (MRR, churn, dunning recovery) builds on this pattern:
-- owner-run views over billing tables, no subscriber identifiers.
create view analytics.subscription_counts
with (security_barrier = true) as
select pl.code as plan_code, s.status::text as status, pg_catalog.count(*)::bigint as subscriptions
  from billing.subscriptions s
  join billing.plans pl on pl.id = s.plan_id
 group by pl.code, s.status;
revoke all on analytics.subscription_counts from public, anon, authenticated, service_role, billing_service;
grant select on analytics.subscription_counts to analyst;
comment on view analytics.subscription_counts is 'Subscriptions per plan and status. For role analyst.';

do $$
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
