"""Configuration: file < env < flags, strict validation, clear errors, non-zero exits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.settings import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent
GOOD_SALT = "x7Gq2mZp9LrT4vWc8NbJ3kHs6YdF1aQe5UoIiPl0"


def write(tmp_path: Path, data: object) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def check(config: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", config],
        capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env}, timeout=30,
    )  # fmt: skip


def test_example_config_is_valid() -> None:
    result = check(str(ROOT / "config/example.yaml"), KEYBEARER_SALT=GOOD_SALT)
    assert result.returncode == 0, result.stderr
    assert "deepwiki" in result.stdout


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    config = write(
        tmp_path, {"listen": "127.0.0.1:1111", "public_url": "http://file.example", "log_level": "error"}
    )
    env = {"KEYBEARER_LISTEN": "127.0.0.1:2222", "KEYBEARER_PUBLIC_URL": "http://env.example"}
    settings = load_settings(config, env=env, flags={"listen": "127.0.0.1:3333"})
    assert settings.listen == "127.0.0.1:3333"  # flag beats env
    assert settings.public_url == "http://env.example"  # env beats file
    assert settings.log_level == "error"  # file beats default


def test_secret_from_file_twin(tmp_path: Path) -> None:
    secret = tmp_path / "salt"
    secret.write_text(GOOD_SALT + "\n")
    settings = load_settings(None, env={"KEYBEARER_SALT_FILE": str(secret)})
    assert settings.salt == GOOD_SALT
    assert load_settings(None, env={"SALT": GOOD_SALT}).salt == GOOD_SALT


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"listen": "127.0.0.1:1", "lisen": "x"}, "lisen"),
        (
            {"servers": {"a": {"url": "http://127.0.0.1/mcp", "auth": "none", "api_key_envv": "X"}}},
            "servers.a.api_key_envv",
        ),
        ({"servers": {"a": {"url": "ftp://127.0.0.1/mcp", "auth": "none"}}}, "servers.a.url"),
        ({"servers": {"a": {"url": "http://u:p@127.0.0.1/mcp", "auth": "none"}}}, "servers.a.url"),
        ({"servers": {"a": {"url": "http://127.0.0.1/mcp", "auth": "oath"}}}, "servers.a.auth"),
        ({"servers": {"a": {"auth": "none"}}}, "servers.a.url"),
        ({"servers": {"A/b": {"url": "http://127.0.0.1/mcp"}}}, "servers.A/b"),
        (
            {"servers": {"a": {"url": "http://127.0.0.1/mcp", "auth": "none", "api_key_env": "K"}}},
            "servers.a.api_key_env",
        ),
        (
            {
                "servers": {
                    "a": {"url": "http://127.0.0.1/mcp", "auth": "api_key", "api_key_header": "Bad Header"}
                }
            },
            "servers.a.api_key_header",
        ),
        ({"servers": {"a": {"url": "http://127.0.0.1/mcp", "paths": ["/x/../admin"]}}}, "servers.a.paths[0]"),
        ({"listen": "nonsense"}, "listen"),
        ({"max_body_bytes": "lots"}, "max_body_bytes"),
        ({"servers": ["a", "b"]}, "servers"),
        # Without an audience, a token the issuer made for any other service would pass.
        (
            {
                "inbound_auth": "jwt",
                "jwt_jwks_url": "https://idp.example/jwks",
                "jwt_issuer": "https://idp.example",
            },
            "jwt_audience",
        ),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, config: dict, key: str) -> None:
    path = write(tmp_path, config)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.key == key
    result = check(path, KEYBEARER_SALT=GOOD_SALT)
    assert result.returncode == 2
    assert f"error: {key}:" in result.stderr
    assert "Traceback" not in result.stderr


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    result = check(write(tmp_path, "servers: [unclosed"), KEYBEARER_SALT=GOOD_SALT)
    assert result.returncode == 2 and "not valid YAML at line" in result.stderr
    result = check(str(tmp_path / "absent.yaml"), KEYBEARER_SALT=GOOD_SALT)
    assert result.returncode == 2 and "cannot read" in result.stderr


@pytest.mark.parametrize(
    ("salt", "says"),
    [
        (None, "not set"),
        ("tooshort", "too short"),
        ("changeme" * 5, "placeholder"),
        ("a" * 40, "placeholder"),
    ],
)
def test_bad_salt_stops_with_how_to_fix(tmp_path: Path, salt: str | None, says: str) -> None:
    env = {} if salt is None else {"KEYBEARER_SALT": salt}
    result = check(write(tmp_path, {}), **env)
    assert result.returncode == 2
    assert says in result.stderr and "secrets.token_urlsafe" in result.stderr
    # serve refuses the same way, before listening on anything
    serve = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", write(tmp_path, {}), "--listen", "127.0.0.1:1"],
        capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env}, timeout=30,
    )  # fmt: skip
    assert serve.returncode == 2 and says in serve.stderr


def test_catalog_entries_are_valid_servers() -> None:
    from proxy.settings import parse_server

    catalog = yaml.safe_load((ROOT / "config/catalog.yaml").read_text())
    assert len(catalog["servers"]) >= 10
    for server_id, body in catalog["servers"].items():
        parse_server(server_id, body, key=f"catalog.{server_id}")
