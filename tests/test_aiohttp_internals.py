"""The start-up check of aiohttp's private names (corsproxy.http.protocol.check_internals).

The connection guards and the preflight fast path use names aiohttp does not promise to keep; the check decides, once,
which of them can run. These tests run it against the installed aiohttp and against stand-ins that lack a name, as a
future aiohttp release might.
"""

from __future__ import annotations

import pytest
from aiohttp import web

from corsproxy.http.protocol import FAST_PATH_NAMES, FORWARD_NAMES, GUARD_NAMES, check_internals


class _Handler:
    """A stand-in connection handler with every name the check looks for (aiohttp's newest queue flavour)."""

    def __init__(self, *, without: tuple[str, ...] = (), queue: tuple[str, ...] = ("_buffer_paused",)) -> None:
        names = {*GUARD_NAMES, *FAST_PATH_NAMES, *FORWARD_NAMES}
        if queue:
            names |= {"_max_msg_queue_size", *queue}
        for name in names - set(without):
            setattr(self, name, None)

    def _resume_reading_if_drained(self) -> None: ...


class _OlderHandler(_Handler):
    def _resume_msg_queue_reading(self) -> None: ...


class _Parser:
    def message_consumed(self) -> None: ...


class _Runner:
    async def _make_server(self) -> None: ...


async def test_the_installed_aiohttp_has_every_name() -> None:
    server = web.Server(lambda request: None)  # type: ignore[arg-type, return-value]
    internals = check_internals(server())
    assert internals.missing == ()
    assert internals.guards and internals.fast_path and internals.forward


def test_a_complete_stand_in_passes() -> None:
    internals = check_internals(_Handler(), _Runner, parser=_Parser)
    assert internals.missing == ()
    assert internals.guards and internals.fast_path and internals.forward
    assert internals.queue_resume == ("_buffer_paused", "_resume_reading_if_drained")


def test_the_older_queue_flavour_is_used_where_it_is_the_one_there() -> None:
    internals = check_internals(_OlderHandler(queue=("_msg_queue_paused",)), _Runner, parser=_Parser)
    assert internals.fast_path
    assert internals.queue_resume == ("_msg_queue_paused", "_resume_msg_queue_reading")


def test_an_aiohttp_without_a_bounded_queue_needs_no_resume() -> None:
    internals = check_internals(_Handler(queue=()), _Runner, parser=object)
    assert internals.fast_path
    assert internals.queue_resume is None
    assert not internals.parser_consumed  # nor a parser to tell


def test_a_bounded_queue_whose_parser_is_not_told_turns_the_fast_path_off() -> None:
    internals = check_internals(_Handler(), _Runner, parser=object)
    assert (internals.guards, internals.fast_path) == (True, False)
    assert "HttpRequestParser.message_consumed" in internals.missing


def test_a_bounded_queue_of_unknown_shape_turns_the_fast_path_off() -> None:
    # A queue that pauses reading, with no known way to resume it: answering from the fast path could leave the
    # connection paused forever, so the fast path is off — and only it.
    internals = check_internals(_Handler(queue=("_some_new_flag",)), _Runner, parser=_Parser)
    assert not internals.fast_path
    assert internals.guards
    assert "_buffer_paused/_resume_reading_if_drained" in internals.missing


@pytest.mark.parametrize("name", FAST_PATH_NAMES)
def test_a_missing_fast_path_name_turns_only_the_fast_path_off(name: str) -> None:
    internals = check_internals(_Handler(without=(name,)), _Runner, parser=_Parser)
    assert (internals.guards, internals.fast_path) == (True, False)
    assert name in internals.missing


@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_a_missing_forwarding_name_turns_only_the_forwarding_fast_path_off(name: str) -> None:
    internals = check_internals(_Handler(without=(name,)), _Runner, parser=_Parser)
    assert internals.missing == (name,)
    assert internals.guards and internals.fast_path
    assert not internals.forward


@pytest.mark.parametrize("name", GUARD_NAMES)
def test_a_missing_guard_name_turns_the_guards_and_the_fast_path_off(name: str) -> None:
    internals = check_internals(_Handler(without=(name,)), _Runner, parser=_Parser)
    assert (internals.guards, internals.fast_path) == (False, False)
    assert name in internals.missing


def test_a_runner_without_make_server_turns_the_guards_off() -> None:
    internals = check_internals(_Handler(), object, parser=_Parser)
    assert not internals.guards
    assert "AppRunner._make_server" in internals.missing
