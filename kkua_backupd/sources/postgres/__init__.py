"""PostgreSQL: backup, restore and verify of one database (job), and the SQL stream follower (pg_sql)."""
