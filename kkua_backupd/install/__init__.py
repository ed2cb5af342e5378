"""`kkua-backup systemd …` and `kkua-backup cron …`: the installers."""
