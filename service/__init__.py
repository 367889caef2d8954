"""saju-billing: subscription billing on Toss Payments billing keys, database-first on Supabase."""
