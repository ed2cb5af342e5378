"""What every job shares: the context a job is given, retention, the state behind `status`."""
