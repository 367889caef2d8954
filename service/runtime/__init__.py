"""The local runtime: a Supabase-compatible PostgreSQL cluster with pg_cron, pg_net and Vault."""
