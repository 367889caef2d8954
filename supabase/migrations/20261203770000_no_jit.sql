-- No JIT compilation inside billing's own functions.
--
-- At a million subscriptions the generic plan of the tick's renewal statement ("limit batch", the
-- batch unknown at planning) is estimated above jit_above_cost (100,000), so every call compiled it
-- with LLVM: about 27 ms per call (pg_stat_statements' jit columns), half of a steady minute's
-- renewal step (64 ms with JIT, 32 ms without: the same 23 renewals, rolled back and repeated, six
-- runs each). Billing's statements reach a few rows through indexes, where compiling never pays off.
-- The setting is per function: each one already pins search_path, so a second setting costs
-- nothing more per call, and analysts' queries on the analytics views keep the server's setting.
-- "create or replace" resets a function's settings, so a later definition must state it again;
-- pgTAP (18_billing_scale.sql) checks every function here. Procedures cannot pin settings
-- (billing.run_ticks commits); what they call can.
do $$
declare
  f regprocedure;
begin
  for f in
    select p.oid::regprocedure
      from pg_catalog.pg_proc p
      join pg_catalog.pg_namespace n on n.oid = p.pronamespace
     where n.nspname in ('billing', 'api', 'api_impl') and p.prokind = 'f'
       and not exists (select 1 from pg_catalog.pg_depend d
                        where d.classid = 'pg_catalog.pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')
     order by p.oid
  loop
    execute pg_catalog.format('alter function %s set jit = off', f);
  end loop;
end
$$;
