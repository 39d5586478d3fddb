"""``ProgramState``: the ``s`` a program receives and the object ``run`` returns."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

from portaserve.lang.ir import Join, RoleBegin, RoleEnd


class ProgramState:
    def __init__(self, executor):
        self._ex = executor

    # ---- building -------------------------------------------------------------------------
    def __iadd__(self, expr):
        self._ex.submit(expr)
        return self

    def __add__(self, expr):
        raise TypeError("use s += ... to extend a program state")

    @contextmanager
    def _role(self, role: str):
        self._ex.submit(RoleBegin(role))
        yield
        self._ex.submit(RoleEnd(role))

    def system(self):
        """``with s.system(): s += ...``"""
        return self._role("system")

    def user(self):
        return self._role("user")

    def assistant(self):
        return self._role("assistant")

    def fork(self, n: int = 1) -> "ForkGroup":
        """n independent copies of this state, sharing its (prefilled) prefix."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"fork needs an integer n >= 1, got {n!r}")
        return ForkGroup(self, [ProgramState(k) for k in self._ex.fork(n)])

    def join(self, forks: "ForkGroup", mode: str = "gather_variable") -> None:
        forks.join(mode)

    # ---- reading --------------------------------------------------------------------------
    def __getitem__(self, name: str):
        return self._ex.get_var(name)

    def get_var(self, name: str):
        return self._ex.get_var(name)

    def set_var(self, name: str, value) -> None:
        self._ex.sync()
        self._ex.variables[name] = value

    def get_meta_info(self, name: str) -> dict:
        """The backend's meta_info for a gen (prompt/cached/completion tokens, finish
        reason), or a select's per-choice scores."""
        self._ex.get_var(name)
        return self._ex.meta_info.get(name)

    def variables(self) -> dict:
        self._ex.sync()
        return dict(self._ex.variables)

    def text(self) -> str:
        self._ex.sync()
        return self._ex.text

    def messages(self) -> list:
        self._ex.sync()
        return [dict(m) for m in self._ex.messages]

    @property
    def error(self):
        """The LangError that stopped this state, or None."""
        return self._ex.error

    def sync(self) -> None:
        self._ex.sync()

    def text_iter(self, var_name: Optional[str] = None):
        """Text as it is produced (run with stream=True to get a gen token by token);
        ``var_name`` restricts it to one variable's text."""
        return self._ex.iter_events(var_name)

    @classmethod
    def failed(cls, backend, error) -> "ProgramState":
        from portaserve.lang.interpreter import StreamExecutor

        ex = StreamExecutor(backend)
        ex.error = error
        ex.end()
        ex.wait_done()
        st = cls(ex)
        error.state = st
        return st

    def __repr__(self) -> str:
        return f"ProgramState(text={self._ex.text[-60:]!r}, vars={list(self._ex.variables)})"


class ForkGroup(list):
    """The list of forked states; ``join()`` merges them back into the parent."""

    def __init__(self, parent: ProgramState, states: list):
        super().__init__(states)
        self.parent = parent

    def join(self, mode: str = "gather_variable") -> None:
        """gather_variable: each variable set in the forks becomes, in the parent, the list
        of its values (one per fork); concate_and_append: the forks' new text is appended
        to the parent.  Queued like any expression, so it does not block the program."""
        self.parent._ex.submit(Join([s._ex for s in self], mode))

    def __iadd__(self, expr):
        """``forks += expr`` appends expr (or expr[i] for a list) to every fork."""
        exprs = expr if isinstance(expr, list) and len(expr) == len(self) else [expr] * len(self)
        for s, e in zip(self, exprs):
            s += e
        return self

    def __getitem__(self, i):
        if isinstance(i, str):
            return [s[i] for s in self]
        return super().__getitem__(i)
