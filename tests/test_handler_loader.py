"""Handler specs: built-ins, module:attr, and plug-ins found through entry points."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

from segment_relay.handlers.api import FunctionHandler
from segment_relay.handlers.builtin import JsonlHandler, LogHandler, WebhookHandler
from segment_relay.handlers.loader import (
    ENTRY_POINT_GROUP,
    HandlerSpecError,
    available_handlers,
    load_handler,
)

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture
def targets(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """tests/handler_targets.py, importable as ``handler_targets`` the way a spec names it."""
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    module = importlib.import_module("handler_targets")
    module.RECEIVED.clear()
    return module


def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entries: dict[str, str],
                   dist: str = "relay_test_plugin") -> None:
    """A real (if tiny) installed distribution: a dist-info directory on sys.path."""
    info = tmp_path / "site" / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entries.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


# --- built-ins ---------------------------------------------------------------------------------------


def test_log() -> None:
    handler = load_handler("log")
    assert isinstance(handler, LogHandler) and handler.name == "log"


def test_jsonl(tmp_path: Path) -> None:
    handler = load_handler(f"jsonl:{tmp_path / 'out.jsonl'}")
    assert isinstance(handler, JsonlHandler)
    assert handler.path == tmp_path / "out.jsonl"


def test_webhook() -> None:
    handler = load_handler("webhook:https://hooks.example.com/x?sig=SECRET")
    assert isinstance(handler, WebhookHandler)
    assert "SECRET" not in repr(handler)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("jsonl", "jsonl needs a path"),
        ("jsonl:", "jsonl needs a path"),
        ("webhook", "webhook needs a URL"),
        ("webhook:", "webhook needs a URL"),
        ("log:extra", "takes no argument"),
        ("", "empty handler spec"),
    ],
)
def test_builtin_misuse(spec: str, match: str) -> None:
    with pytest.raises(HandlerSpecError, match=match):
        load_handler(spec)


def test_bad_webhook_url_is_redacted() -> None:
    with pytest.raises(HandlerSpecError) as info:
        load_handler("webhook:ftp://relay:hunter2pw@example.com/x?sig=SECRET")
    message = str(info.value)
    assert "http:// or https://" in message
    assert "SECRET" not in message and "hunter2pw" not in message


def test_spec_error_is_a_value_error() -> None:
    assert issubclass(HandlerSpecError, ValueError)


# --- module:attr -------------------------------------------------------------------------------------


async def test_async_function_is_wrapped(targets: ModuleType) -> None:
    handler = load_handler("handler_targets:record_change")
    assert isinstance(handler, FunctionHandler)
    assert handler.name == "handler_targets:record_change"
    change = targets.make_change()
    await handler.handle(change)
    assert targets.RECEIVED == [change]


async def test_dotted_attribute(targets: ModuleType) -> None:
    handler = load_handler("handler_targets:Namespace.fn")
    assert isinstance(handler, FunctionHandler)
    await handler.handle(targets.make_change())
    assert len(targets.RECEIVED) == 1


def test_handler_subclass_is_instantiated(targets: ModuleType) -> None:
    handler = load_handler("handler_targets:EchoHandler")
    assert isinstance(handler, targets.EchoHandler)
    assert handler.arg is None


def test_handler_instance_is_used_as_is(targets: ModuleType) -> None:
    assert load_handler("handler_targets:INSTANCE") is targets.INSTANCE


def test_a_handler_from_the_package_itself() -> None:
    assert isinstance(load_handler("segment_relay.handlers.builtin:LogHandler"), LogHandler)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("handler_targets:missing", r"module 'handler_targets' has no attribute 'missing'"),
        ("handler_targets:Namespace.missing", r"'handler_targets:Namespace' has no attribute 'missing'"),
        ("handler_targets:sync_function", "synchronous"),
        ("handler_targets:NotAHandler", "does not subclass"),
        ("handler_targets:NOT_A_HANDLER", "is a int"),
        ("handler_targets:NeedsArgHandler", "constructing NeedsArgHandler with no argument failed"),
        ("no_such_module_for_relay_tests:thing", "cannot import module 'no_such_module_for_relay_tests'"),
        ("handler_targets:not valid", "neither a known handler nor module.path:attr"),
    ],
)
def test_module_attr_errors(targets: ModuleType, spec: str, match: str) -> None:
    with pytest.raises(HandlerSpecError, match=match):
        load_handler(spec)


def test_unknown_name_lists_what_is_valid() -> None:
    with pytest.raises(HandlerSpecError) as info:
        load_handler("nosuchhandler")
    message = str(info.value)
    assert "'nosuchhandler'" in message
    for valid in ("log", "jsonl:PATH", "webhook:URL", ENTRY_POINT_GROUP, "module.path:attr"):
        assert valid in message


# --- entry points ------------------------------------------------------------------------------------


def test_entry_points_are_discovered(
    targets: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_plugin(tmp_path, monkeypatch, {
        "echo": "handler_targets:EchoHandler",
        "recorder": "handler_targets:record_change",
        "needsarg": "handler_targets:NeedsArgHandler",
        "broken": "handler_targets:does_not_exist",
    })

    found = available_handlers()
    assert {"log", "jsonl", "webhook", "echo", "recorder"} <= found.keys()
    assert "handler_targets:EchoHandler" in found["echo"]

    plain = load_handler("echo")
    assert isinstance(plain, targets.EchoHandler) and plain.arg is None
    with_arg = load_handler("echo:some:arg")  # everything after the first ':' is the argument
    assert isinstance(with_arg, targets.EchoHandler) and with_arg.arg == "some:arg"

    recorder = load_handler("recorder")
    assert isinstance(recorder, FunctionHandler) and recorder.name == "recorder"
    with pytest.raises(HandlerSpecError, match="takes no argument"):
        load_handler("recorder:x")

    with pytest.raises(HandlerSpecError, match="loading plug-in 'broken'"):
        load_handler("broken")

    # A plug-in's constructor error never shows the secret parts of the URL it was given.
    with pytest.raises(HandlerSpecError) as info:
        load_handler("needsarg:http://relay:hunter2pw@example.com/x?sig=SECRET")
    assert "http://example.com/…?…" in str(info.value)
    assert "SECRET" not in str(info.value) and "hunter2pw" not in str(info.value)

    # The installed names show up in the error for an unknown one.
    with pytest.raises(HandlerSpecError, match=r"echo\[:ARG\]"):
        load_handler("nosuchhandler")


def test_builtins_win_over_entry_points(
    targets: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_plugin(tmp_path, monkeypatch, {"log": "handler_targets:EchoHandler"})
    assert isinstance(load_handler("log"), LogHandler)


def test_plugin_installed_twice_differently_is_ambiguous(
    targets: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_plugin(tmp_path / "a", monkeypatch, {"echo": "handler_targets:EchoHandler"}, dist="plugin_a")
    install_plugin(tmp_path / "b", monkeypatch, {"echo": "handler_targets:INSTANCE"}, dist="plugin_b")
    with pytest.raises(HandlerSpecError, match="more than once"):
        load_handler("echo")


def test_no_plugins_leak_between_tests() -> None:
    # monkeypatch restored sys.path, so the temporary distributions are gone again.
    assert "echo" not in available_handlers()
    with pytest.raises(HandlerSpecError, match="unknown handler 'echo'"):
        load_handler("echo")
