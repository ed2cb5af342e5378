"""The backup folder: sets and manifests (storage), per-target locks (lock)."""
