-- The audit log's statement triggers without a JSON round trip per row.
--
-- billing.audit_status read every changed row as jsonb (the whole row: a payment's raw snapshot, a
-- webhook's payload) so that one body could serve every table, joined old to new rows on the JSON
-- text of their ids, and looked the actor up again for each row. A charge fires five of these, so
-- they were about a quarter of what recording one cost. plpgsql compiles a trigger function once
-- per table, so the columns can be named: the body below is compiled for each audited table that
-- has a status and a status_reason; payments (no status_reason) and customers (no status) get one
-- each. The actor is looked up once per statement. The events written are the same, in the same
-- order.

create or replace function billing.audit_status()
returns trigger
language plpgsql
set search_path = ''
as $$
declare
  v_role text := billing.actor_role();
  v_sub text := billing.jwt_sub();
begin
  if tg_op = 'INSERT' then
    insert into billing.events (actor_role, actor_sub, entity_type, entity_id, action, new_status, reason)
    select v_role, v_sub, tg_table_name, n.id, 'created', n.status::text, n.status_reason
      from (select r.id, r.status, r.status_reason, pg_catalog.row_number() over () as pos from new_rows r) n
     order by n.pos;
  else
    -- A reason left over from an earlier transition is not this transition's reason.
    insert into billing.events (actor_role, actor_sub, entity_type, entity_id, action, old_status, new_status, reason)
    select v_role, v_sub, tg_table_name, n.id, 'status_changed', o.status::text, n.status::text,
           nullif(n.status_reason, o.status_reason)
      from (select r.id, r.status, r.status_reason, pg_catalog.row_number() over () as pos from new_rows r) n
      join old_rows o on o.id = n.id
     where o.status is distinct from n.status
     order by n.pos;
  end if;
  return null;
end
$$;
revoke execute on function billing.audit_status() from public;
comment on function billing.audit_status() is
  'Statement trigger (transition tables new_rows, old_rows) on a table with id, status and '
  'status_reason: writes an event for every inserted row and every status change, in one insert per '
  'statement. Raises nothing.';

create function billing.audit_payment_status()
returns trigger
language plpgsql
set search_path = ''
as $$
declare
  v_role text := billing.actor_role();
  v_sub text := billing.jwt_sub();
begin
  if tg_op = 'INSERT' then
    insert into billing.events (actor_role, actor_sub, entity_type, entity_id, action, new_status)
    select v_role, v_sub, tg_table_name, n.id, 'created', n.status
      from (select r.id, r.status, pg_catalog.row_number() over () as pos from new_rows r) n
     order by n.pos;
  else
    insert into billing.events (actor_role, actor_sub, entity_type, entity_id, action, old_status, new_status)
    select v_role, v_sub, tg_table_name, n.id, 'status_changed', o.status, n.status
      from (select r.id, r.status, pg_catalog.row_number() over () as pos from new_rows r) n
      join old_rows o on o.id = n.id
     where o.status is distinct from n.status
     order by n.pos;
  end if;
  return null;
end
$$;
revoke execute on function billing.audit_payment_status() from public;
comment on function billing.audit_payment_status() is
  'Statement trigger on payments (transition tables new_rows, old_rows): an event for every payment '
  'stored and every change of its Toss status, in one insert per statement. Raises nothing.';

create function billing.audit_created()
returns trigger
language plpgsql
set search_path = ''
as $$
declare
  v_role text := billing.actor_role();
  v_sub text := billing.jwt_sub();
begin
  insert into billing.events (actor_role, actor_sub, entity_type, entity_id, action)
  select v_role, v_sub, tg_table_name, n.id, 'created'
    from (select r.id, pg_catalog.row_number() over () as pos from new_rows r) n
   order by n.pos;
  return null;
end
$$;
revoke execute on function billing.audit_created() from public;
comment on function billing.audit_created() is
  'Statement trigger on inserts into a table without a status (customers, transition table new_rows): '
  'a created event for every row, in one insert. Raises nothing.';

drop trigger payments_audit_insert on billing.payments;
create trigger payments_audit_insert after insert on billing.payments referencing new table as new_rows
  for each statement execute function billing.audit_payment_status();
drop trigger payments_audit_status on billing.payments;
create trigger payments_audit_status after update on billing.payments
  referencing old table as old_rows new table as new_rows
  for each statement execute function billing.audit_payment_status();
drop trigger customers_audit_insert on billing.customers;
create trigger customers_audit_insert after insert on billing.customers referencing new table as new_rows
  for each statement execute function billing.audit_created();

-- Subscriptions: the same events, the actor looked up once per statement.
create or replace function billing.audit_subscription_settings()
returns trigger
language plpgsql
set search_path = ''
as $$
declare
  v_role text := billing.actor_role();
  v_sub text := billing.jwt_sub();
begin
  insert into billing.events (actor_role, actor_sub, entity_type, entity_id, action, old_status, new_status,
                              reason, details)
  select v_role, v_sub, tg_table_name, n.id, e.action, e.old_status, e.new_status,
         nullif(n.status_reason, o.status_reason), e.details
    from (select r.*, pg_catalog.row_number() over () as pos from new_rows r) n
    join old_rows o on o.id = n.id
   cross join lateral (values
     (1, 'settings_changed', null, null, pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
        'cancel_at_period_end', case when n.cancel_at_period_end is distinct from o.cancel_at_period_end
                                     then pg_catalog.to_jsonb(n.cancel_at_period_end) end,
        'payment_method_id', case when n.payment_method_id is distinct from o.payment_method_id
                                  then pg_catalog.to_jsonb(n.payment_method_id) end,
        'awaiting_card', case when n.awaiting_card is distinct from o.awaiting_card
                              then pg_catalog.to_jsonb(n.awaiting_card) end,
        'current_period_index', case when n.current_period_index is distinct from o.current_period_index
                                     then pg_catalog.to_jsonb(n.current_period_index) end))),
     (2, 'status_changed', o.status::text, n.status::text, null::jsonb)
   ) e(step, action, old_status, new_status, details)
   where (e.step = 1 and (n.cancel_at_period_end is distinct from o.cancel_at_period_end
                          or n.payment_method_id is distinct from o.payment_method_id
                          or n.awaiting_card is distinct from o.awaiting_card
                          or n.current_period_index is distinct from o.current_period_index))
      or (e.step = 2 and n.status is distinct from o.status)
   order by n.pos, e.step;
  return null;
end
$$;
revoke execute on function billing.audit_subscription_settings() from public;
comment on function billing.audit_subscription_settings() is
  'Statement trigger on subscriptions updates (transition tables new_rows, old_rows): per changed row, '
  'a settings_changed event when its cancel flag, card, awaiting-card flag or period changed, then a '
  'status_changed event when its status changed; one insert per statement. Raises nothing.';

select billing.assert_surface_locked_down();
