"""The README stays true to the code: every setting is documented, every command exists."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings

from services.api.settings import ApiSettings
from services.worker.settings import WorkerSettings
from services.ws_gateway.settings import GatewaySettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme() -> None:
    """Each LONGHAUL_* env var a service reads appears in the README's configuration."""
    classes: list[type[BaseSettings]] = [ApiSettings, WorkerSettings, GatewaySettings]
    names = {f"LONGHAUL_{field.upper()}" for cls in classes for field in cls.model_fields}
    missing = sorted(name for name in names if f"`{name}`" not in README)
    assert not missing, f"settings missing from README.md: {missing}"


def test_readme_gives_the_two_commands_first() -> None:
    """`make up` and `make test` come before anything else the README explains."""
    first_section = README.split("\n## ")[1]
    assert "make up" in first_section and "make test" in first_section
