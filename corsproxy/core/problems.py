"""Problems: what is wrong with an operator's input, where, and how to fix it — one value for every door.

Config validation, origin parsing, the origin write service, the CLI and the admin API all describe a refusal with a
:class:`Problem`, so an operator reads the same words (and a tool matches the same ``code``) whether the bad origin
came from ``config.yaml``, ``corsproxy origins add`` or ``PUT /origins/...``. Each door only says *where*: a YAML
path (``cors.routes[2].allow_origins[0]``), a CLI argument (``origin``, ``--policy``) or a request location
(``path.origin``, ``body.policy``, ``query.limit``) — see :meth:`Problem.at`.

Must not import aiohttp, lmdb or yaml: this is pure core code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

__all__ = ["Problem", "ProblemError", "field_of"]

_INDEX = re.compile(r"\[[^\]]*\]")


def field_of(path: str) -> str:
    """The field a path ends in: ``cors.routes[2].allow_origins[0]`` -> ``allow_origins``, ``body.policy`` ->
    ``policy``, ``env CORSPROXY_PORT`` -> ``CORSPROXY_PORT``; ``""`` for no path."""
    last = _INDEX.sub("", path).rsplit(".", 1)[-1]
    return last.rsplit(" ", 1)[-1]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an input.

    ``path`` is where it was written (empty until a door places it, see :meth:`at`); ``field`` the field's name;
    ``code`` a stable snake_case identifier for tools (never reworded); ``message`` what is wrong and how to fix it,
    for humans (it may be reworded).
    """

    path: str
    field: str
    code: str
    message: str

    def __str__(self) -> str:
        """What users read: ``path: message`` (the message alone while unplaced)."""
        return f"{self.path}: {self.message}" if self.path else self.message

    def at(self, path: str) -> Problem:
        """The same problem placed at ``path`` (its field is kept: the path of a request or a CLI argument need
        not end in the field's own name)."""
        return replace(self, path=path)

    def as_json(self) -> dict[str, str]:
        return {"path": self.path, "field": self.field, "code": self.code, "message": self.message}


class ProblemError(ValueError):
    """A refusal carrying its problems; ``str()`` is their messages joined by ``"; "``, as users read them."""

    def __init__(self, *problems: Problem) -> None:
        if not problems:
            raise TypeError("ProblemError needs at least one Problem")
        self.problems: tuple[Problem, ...] = problems
        super().__init__("; ".join(problem.message for problem in problems))

    @property
    def problem(self) -> Problem:
        """The first problem (most errors carry exactly one)."""
        return self.problems[0]
