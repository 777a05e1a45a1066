"""Turns a handler spec from the command line or config into a ``Handler``.

Specs, tried in this order:

* ``log`` - one JSON line per change on stdout
* ``jsonl:PATH`` - append JSON lines to PATH
* ``webhook:URL`` - POST each change to URL; ``webhook:URL#batch=N``: arrays of up to N changes
* ``NAME[:ARG]`` - an installed plug-in: an entry point named NAME in the
  ``segment_relay.handlers`` group; ARG, if given, is its one constructor argument
* ``module.path:attr`` - import ``module.path`` and take ``attr`` (dotted allowed)

What a plug-in or ``module:attr`` names may be a ``Handler`` instance, a ``Handler``
subclass (instantiated), or an ``async def`` function taking one change.
"""

from __future__ import annotations

import importlib
import inspect
import re
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .api import FunctionHandler, Handler
from .builtin import JsonlHandler, LogHandler, WebhookBatchHandler, WebhookHandler, redact_url

__all__ = ["ENTRY_POINT_GROUP", "HandlerSpecError", "load_handler", "available_handlers"]

ENTRY_POINT_GROUP = "segment_relay.handlers"

_BUILTINS: dict[str, str] = {
    "log": "one JSON line per change on stdout (spec: log)",
    "jsonl": "append one JSON line per change to a file (spec: jsonl:PATH)",
    "webhook": "POST each change as JSON to a URL (spec: webhook:URL, or webhook:URL#batch=N for arrays)",
}

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


class HandlerSpecError(ValueError):
    """A handler spec that names nothing loadable; the message says what would be valid."""


def available_handlers() -> dict[str, str]:
    """Name -> one-line description of every built-in and installed plug-in handler, for the CLI."""
    found = dict(_BUILTINS)
    for ep in _handler_entry_points():
        if ep.name in found:
            continue  # built-ins win, and the first of duplicate plug-ins is the one load_handler reports
        dist = getattr(ep, "dist", None)
        origin = f" from {dist.name}" if dist is not None and getattr(dist, "name", None) else ""
        found[ep.name] = f"plug-in {ep.value}{origin}"
    return found


def load_handler(spec: str) -> Handler:
    """Resolve one handler spec (see the module docstring) or raise HandlerSpecError saying why."""
    if not isinstance(spec, str) or not spec.strip():
        raise HandlerSpecError(f"empty handler spec; {_valid_specs()}")
    spec = spec.strip()
    name, sep, arg = spec.partition(":")

    if name == "log":
        if sep:
            raise HandlerSpecError(f"handler spec {_shown(spec)!r}: 'log' takes no argument; use just 'log'")
        return LogHandler()
    if name == "jsonl":
        if not arg:
            raise HandlerSpecError(f"handler spec {_shown(spec)!r}: jsonl needs a path, e.g. jsonl:changes.jsonl")
        return JsonlHandler(arg)
    if name == "webhook":
        if not arg:
            raise HandlerSpecError(
                f"handler spec {_shown(spec)!r}: webhook needs a URL, e.g. webhook:https://example.com/hook"
            )
        try:
            return _webhook(arg)
        except ValueError as exc:  # WebhookHandler's messages already redact the URL
            raise HandlerSpecError(f"handler spec {_shown(spec)!r}: {exc}") from None

    plugins = [ep for ep in _handler_entry_points() if ep.name == name]
    if plugins:
        values = sorted({ep.value for ep in plugins})
        if len(values) > 1:
            raise HandlerSpecError(
                f"handler spec {_shown(spec)!r}: plug-in {name!r} is installed more than once, "
                f"pointing at {', '.join(values)}; uninstall all but one"
            )
        ep = plugins[0]
        try:
            obj = ep.load()
        except Exception as exc:
            raise HandlerSpecError(
                f"handler spec {_shown(spec)!r}: loading plug-in {name!r} ({ep.value}) failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return _to_handler(obj, spec, what=f"plug-in {name!r} ({ep.value})", arg=arg if sep else None,
                           default_name=name)

    if not sep:
        raise HandlerSpecError(f"unknown handler {_shown(spec)!r}; {_valid_specs()}")
    module_name, attr_path = name, arg
    if not _DOTTED.fullmatch(module_name) or not _DOTTED.fullmatch(attr_path):
        raise HandlerSpecError(
            f"handler spec {_shown(spec)!r} is neither a known handler nor module.path:attr; {_valid_specs()}"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise HandlerSpecError(
            f"handler spec {_shown(spec)!r}: cannot import module {module_name!r} "
            f"({type(exc).__name__}: {exc}); {_valid_specs()}"
        ) from exc
    parts = attr_path.split(".")
    for depth, part in enumerate(parts):
        try:
            target = getattr(target, part)
        except AttributeError:
            owner = f"module {module_name!r}" if depth == 0 else repr(f"{module_name}:{'.'.join(parts[:depth])}")
            raise HandlerSpecError(f"handler spec {_shown(spec)!r}: {owner} has no attribute {part!r}") from None
    return _to_handler(target, spec, what=f"{module_name}:{attr_path}", arg=None, default_name=spec)


def _webhook(arg: str) -> Handler:
    """``URL`` or ``URL#batch=N``. Options ride in the fragment because a fragment is never sent:
    they cannot clash with the receiver's own query parameters or a signed query string."""
    url, _, options = arg.partition("#")
    if not options:
        return WebhookHandler(url)
    name, _, value = options.partition("=")
    if name != "batch" or not value.isdigit():
        raise ValueError("unknown webhook option after '#': the one option is #batch=N (changes per POST)")
    return WebhookBatchHandler(url, batch=int(value))


def _to_handler(obj: object, spec: str, *, what: str, arg: str | None, default_name: str) -> Handler:
    shown = _shown(spec)
    if isinstance(obj, Handler):
        if arg is not None:
            raise HandlerSpecError(f"handler spec {shown!r}: {what} is a handler instance and takes no argument")
        return obj
    if isinstance(obj, type):
        if not issubclass(obj, Handler):
            raise HandlerSpecError(
                f"handler spec {shown!r}: {what} is the class {obj.__qualname__}, "
                "which does not subclass segment_relay.handlers.api.Handler"
            )
        try:
            factory: Any = obj  # a subclass may take one argument; Handler itself takes none
            return factory() if arg is None else factory(arg)
        except Exception as exc:
            given = "no argument" if arg is None else "its argument"
            raise HandlerSpecError(
                f"handler spec {shown!r}: constructing {obj.__qualname__} with {given} failed: "
                f"{type(exc).__name__}: {_redact_text(str(exc), arg)}"
            ) from None
    if inspect.iscoroutinefunction(obj):
        if arg is not None:
            raise HandlerSpecError(f"handler spec {shown!r}: {what} is a function and takes no argument")
        return FunctionHandler(obj, name=default_name)  # type: ignore[arg-type]
    if callable(obj):
        raise HandlerSpecError(
            f"handler spec {shown!r}: {what} is a synchronous callable; a handler function must be "
            "'async def fn(change)'"
        )
    raise HandlerSpecError(
        f"handler spec {shown!r}: {what} is a {type(obj).__name__}, not a Handler instance, "
        "Handler subclass or async function"
    )


def _handler_entry_points() -> list[EntryPoint]:
    return list(entry_points(group=ENTRY_POINT_GROUP))


def _valid_specs() -> str:
    plugins = sorted({ep.name for ep in _handler_entry_points()} - _BUILTINS.keys())
    installed = ", ".join(f"{name}[:ARG]" for name in plugins) if plugins else "none installed"
    return (
        "valid: log, jsonl:PATH, webhook:URL, an installed plug-in "
        f"(entry point group {ENTRY_POINT_GROUP}: {installed}), or module.path:attr"
    )


def _shown(spec: str) -> str:
    """The spec as it may appear in a message: any URL in its argument is redacted."""
    name, sep, arg = spec.partition(":")
    if not sep:
        return spec
    if name == "webhook" or "://" in arg:
        return f"{name}:{redact_url(arg)}"
    return spec


def _redact_text(text: str, arg: str | None) -> str:
    """A plug-in's own error may quote the URL it was given: replace it with the redacted form."""
    if arg and "://" in arg and arg in text:
        return text.replace(arg, redact_url(arg))
    return text
