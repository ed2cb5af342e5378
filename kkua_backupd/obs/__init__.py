"""What operators see: log lines (logs) and progress lines (progress)."""
