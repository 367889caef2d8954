-- Room on each page for a row's next version, so that updates which change no indexed column stay
-- on their page (HOT) and write no index entry.
--
-- A subscriber's cancel and resume, a plain approval's subscription update and a spent credit
-- change no indexed column. But pages filled at Postgres' default fillfactor (100) have no room,
-- as bulk-loaded pages and pages filled by months of inserts do: each of those updates moved the
-- row to another page and wrote an entry into every index of its table (8 on subscriptions, 7 on
-- credit_grants), most of them at a random leaf, which at a million subscribers is a read from disk.
-- 90 leaves room for about three more versions of either row (250-280 bytes) per page. It applies
-- to pages filled from now on; existing ones gain room as vacuum frees old versions.
alter table billing.subscriptions set (fillfactor = 90);
alter table billing.credit_grants set (fillfactor = 90);

select billing.assert_surface_locked_down();
