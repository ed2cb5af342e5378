"""System tests: the project installed and run under a real systemd booted in a container (systemd-nspawn)."""
