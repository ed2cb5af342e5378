"""packaging/compose/compose.yaml is valid YAML with the shape docker compose expects, and says what the
docs promise: the guide's `backup` service under `profiles: ["backup"]`, a long-running `backupd` with a
HEALTHCHECK calling `kkua-backup status`, secrets from compose secrets or an env file, never inline."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from kkua_backupd.config import load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "packaging" / "compose"
# The top-level keys and service keys of the Compose Specification that this file may use.
TOP_KEYS = {"services", "secrets", "volumes", "networks", "configs", "name", "include"}
SERVICE_KEYS = {"image", "build", "command", "entrypoint", "environment", "env_file", "secrets", "volumes",
                "depends_on", "restart", "profiles", "healthcheck", "stop_grace_period", "user", "networks"}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    return loaded


def test_compose_file_has_the_shape_compose_expects() -> None:
    doc = compose()
    assert set(doc) - {key for key in doc if key.startswith("x-")} <= TOP_KEYS
    for name, service in doc["services"].items():
        assert set(service) <= SERVICE_KEYS, (name, set(service) - SERVICE_KEYS)
        assert "image" in service or "build" in service, name
        for secret in service.get("secrets", []):
            assert secret in doc["secrets"], (name, secret)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("./") or source in doc["volumes"], (name, volume)
        for dependency in service.get("depends_on", []):
            assert dependency in doc["services"], (name, dependency)
    for secret in doc["secrets"].values():
        assert set(secret) == {"file"} and secret["file"].startswith("./secrets/")
    assert (COMPOSE / doc["services"]["backup"]["build"]["context"] / "Containerfile").is_file()


def test_backup_service_is_the_guides_and_the_daemon_has_a_healthcheck() -> None:
    services = compose()["services"]
    assert services["db"]["image"] == "postgres:15" and services["redis"]["image"] == "redis:7-alpine"
    backup, daemon = services["backup"], services["backupd"]
    assert backup["profiles"] == ["backup"] and backup["restart"] == "no"
    assert daemon["command"] == ["kkua-backupd"] and daemon["restart"] == "unless-stopped"
    assert daemon["healthcheck"]["test"] == ["CMD", "kkua-backup", "status"]
    for service in (backup, daemon):
        assert "./config.toml:/etc/kkua-backup/config.toml:ro" in service["volumes"]
        assert {"pg_password", "redis_password"} <= set(service["secrets"])
        assert service["env_file"][0]["path"] == "./backup.env"


def test_no_secret_is_written_into_the_compose_files() -> None:
    text = (COMPOSE / "compose.yaml").read_text()
    # Passwords come from /run/secrets or backup.env: no literal after PASSWORD=/PASSWORD: or --requirepass.
    assert not re.search(r"(?i)(PASSWORD[=:]|requirepass)[ \t]*[^\s$/\\\"]", text)
    for service in compose()["services"].values():
        environment = service.get("environment", {})
        assert not any("PASSWORD" in key and not key.endswith("_FILE") for key in environment)


def test_compose_config_is_valid_and_reads_the_secrets() -> None:
    loaded = load_config(str(COMPOSE / "config.toml"), {"DATABASE_PASSWORD": "x", "REDIS_PASSWORD": "y"})
    assert loaded.config.postgres.host == "db" and loaded.config.redis.host == "redis"
    assert str(loaded.config.postgres.password_file) == "/run/secrets/pg_password"
    assert str(loaded.config.redis.password_file) == "/run/secrets/redis_password"
