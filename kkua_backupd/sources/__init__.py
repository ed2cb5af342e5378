"""Data sources: one folder per kind of server backed up (postgres/, redis/)."""
