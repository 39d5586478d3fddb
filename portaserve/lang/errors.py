"""The one exception a program sees: a backend call failed (bad request, server down...).

It carries the backend's message verbatim and, once the program has stopped, the
``state`` it left behind, whose text and variables up to the failure stay readable."""
from __future__ import annotations


class LangError(RuntimeError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status  # HTTP status where there is one
        self.state = None     # the ProgramState, attached by the interpreter
