"""ServiceConfig's settings are described once (kh.service.config.SETTINGS): every field has its
entry, docs/service.md's table is the one made from them (``settings_table``; a failure prints
the table to put there), and `kh service start` offers exactly their options, with their help."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import pytest

from kh.cli.main import main
from kh.service import config
from kh.service.config import SETTINGS, ServiceConfig, Setting

DOCS = Path(__file__).resolve().parents[2] / "docs" / "service.md"
MARK = "<!-- made from kh.service.config.SETTINGS by tests/unit/test_settings_doc.py"


def settings_table() -> str:
    """docs/service.md's table of the settings (Markdown), one row per setting."""
    def code(text: str | None) -> str:
        return f"`{text}`" if text else ""

    def text(words: str) -> str:  # `<prefix>` is no HTML tag; a `|` would end the cell
        return words.replace("<", "&lt;").replace("|", "\\|")

    rows = ["| variable | `kh service start` option | what | allowed | default |",
            "|---|---|---|---|---|"]
    for s in config.SETTINGS:
        option = code(s.option) or ("" if s.env else f"khd's `--{s.field.replace('_', '-')}`")
        rows.append(f"| {code(s.env)} | {option} | {text(s.help)} | {text(s.allowed_text())} "
                    f"| {text(s.default_text())} |")
    return "\n".join(rows) + "\n"


def docs_table(text: str) -> str:
    """The table after the mark in docs/service.md, up to the blank line that ends it."""
    start = text.index("\n", text.index(MARK)) + 1
    return text[start:text.index("\n\n", start) + 1]


def test_every_field_of_the_config_has_one_setting() -> None:
    fields = [f.name for f in dataclasses.fields(ServiceConfig)]
    assert sorted(s.field for s in SETTINGS) == sorted(fields)


def test_each_setting_says_what_it_is_and_its_default_once() -> None:
    for s in SETTINGS:
        assert s.help and s.default_text() and "default" not in s.help, s
        assert s.value is not dataclasses.MISSING or s.default, s
        assert s.kind in ("Path", "int", "str", "str | None", "bool"), s


def test_the_docs_table_is_made_from_the_settings() -> None:
    assert docs_table(DOCS.read_text()) == settings_table(), (
        "docs/service.md's settings table is not SETTINGS'; put in its place:\n"
        + settings_table())


def test_a_setting_added_without_docs_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    extra = Setting("nodes", "KH_NEW", "--new", "a setting the docs do not have yet", 1, 2)
    monkeypatch.setattr(config, "SETTINGS", (*SETTINGS, extra))
    assert docs_table(DOCS.read_text()) != settings_table()
    assert "KH_NEW" in settings_table() and "KH_NEW" in config.env_help()


def test_service_start_offers_exactly_the_settings_options() -> None:
    service = main.commands["service"]
    assert isinstance(service, click.Group)
    start = service.commands["start"]
    options = {opt: p for p in start.params for opt in p.opts}
    assert set(options) - {"--no-wait", "-h", "--help"} == {s.option for s in SETTINGS
                                                             if s.option}
    for s in SETTINGS:
        if s.option:
            p = options[s.option]
            assert p.name == s.field and s.help_text()[1:] in (p.help or "")


@pytest.mark.parametrize(("args", "asked"), [
    ([], {}),
    (["--no-outside"], {"outside": False}),
    (["--port", "7000", "--nodes", "3"], {"api_port": 7000, "nodes": 3}),
    (["--backend", "libvirt", "--placement", "spread"], {"backend": "libvirt",
                                                         "placement": "spread"}),
])
def test_each_option_reaches_its_setting(monkeypatch: pytest.MonkeyPatch, args: list[str],
                                         asked: dict[str, object]) -> None:
    from click.testing import CliRunner

    from kh.cli import service as cli_service

    seen: dict[str, object] = {}

    def from_env(**overrides: object) -> ServiceConfig:
        seen.update({k: v for k, v in overrides.items() if v is not None})
        raise config.UsageError("stop here")

    monkeypatch.setattr(cli_service, "from_env", from_env)
    r = CliRunner().invoke(main, ["service", "start", *args])
    assert r.exit_code == 2 and "stop here" in r.output, r.output
    assert seen == asked
