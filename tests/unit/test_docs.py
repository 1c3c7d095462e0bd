"""The README stays true to the code: every setting is documented, every command exists."""

from __future__ import annotations

from pathlib import Path

import mypy.api
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


def test_the_readmes_handler_type_checks_as_users_check_theirs(tmp_path: Path) -> None:
    """The handler example (an async def and a plain def), with a per-type Backoff as
    the README says to import it, passes `mypy --strict`: every name a handler module
    imports from the SDK is exported (mypy refuses one the SDK merely imported, Backoff
    was), and each handler is given its own kind of context."""
    example = README.split("```python\n# my_tasks.py\n", 1)[1].split("```", 1)[0]
    example = example.replace(
        "from services.worker.sdk import PermanentError, SyncTaskContext, TaskContext, task",
        "from services.worker.sdk import Backoff, PermanentError, SyncTaskContext, TaskContext,"
        " task",
    ).replace(
        '@task("reports.build", max_attempts=3, timeout_s=900)',
        '@task("reports.build", max_attempts=3, timeout_s=900, backoff=Backoff(cap_s=60))',
    )
    assert "Backoff(" in example, "the README's handler example changed: update this test"
    module = tmp_path / "my_tasks.py"
    module.write_text(example)
    out, err, status = mypy.api.run(
        ["--strict", "--cache-dir", str(tmp_path / "cache"), str(module)]
    )
    assert status == 0, out + err
