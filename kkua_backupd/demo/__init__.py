"""The demo (`python -m kkua_backupd.demo`, scripts/demo.sh) and what it needs: a throwaway PostgreSQL
(sandbox) and Redis sample data (redis_sample). Nothing outside this folder imports it."""
