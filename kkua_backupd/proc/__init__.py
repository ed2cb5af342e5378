"""Child processes: every command run (execute), jobs as subprocess workers (workers)."""
