-- Autovacuum after a burst, not after a fifth of the table.
--
-- A day's renewals (1/30 of the subscriptions) rewrite their subscription rows, close their
-- credit grants and move their attempts through their statuses; each leaves dead entries at the
-- low end of the indexes the tick probes in order (the due, expiry and claim indexes). With
-- Postgres' default scale factor (0.2) autovacuum waits for a fifth of a table to be dead, about
-- six days of renewals at any size, and until then every probe walks the dead entries: at a
-- million subscriptions a steady tick took up to 118 ms right after a burst (49 ms once the entries
-- were cleared) and an idle one in a new session 32-64 ms (16-21 ms after a vacuum). One percent (plus the default threshold of 50 rows) vacuums each table once a
-- burst of that size has passed; a vacuum of these tables is incremental (the visibility map skips
-- pages with nothing to do), so vacuuming more often costs little. Analyze follows at two percent,
-- so the planner sees the moved dates. Supabase lets the table owner set these (storage parameters).

alter table billing.subscriptions set (autovacuum_vacuum_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.02);
alter table billing.billing_periods set (autovacuum_vacuum_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.02);
alter table billing.charge_attempts set (autovacuum_vacuum_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.02);
alter table billing.credit_grants set (autovacuum_vacuum_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.02);
alter table billing.notifications set (autovacuum_vacuum_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.02);
alter table billing.card_registrations set (autovacuum_vacuum_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.02);
