"""How ``select`` picks among its choices: SGLang's ``choices_method`` values.

Each choice is scored by the logprobs of its tokens after the current text (see
``StreamExecutor._select``); the method turns those into a pick.

- ``token_length_normalized`` (the default): the highest mean token logprob.
- ``greedy_token_selection``: the highest logprob at the first token where the choices
  differ, then the next, ...; a choice that runs out is continued with its own mean.
- ``unconditional_likelihood_normalized``: the highest mean of (logprob in context minus
  logprob of the same tokens with no context), which discounts choices the model finds
  likely anywhere.  It costs one more backend call.
- ``"sum"``: the highest total logprob (portaserve's own addition).
"""
from __future__ import annotations


class ChoicesMethod(str):
    """A method name that prints as SGLang's object name."""

    def __new__(cls, value: str, sglang_name: str):
        obj = super().__new__(cls, value)
        obj.sglang_name = sglang_name
        return obj

    def __repr__(self) -> str:
        return self.sglang_name


token_length_normalized = ChoicesMethod("normalized", "token_length_normalized")
greedy_token_selection = ChoicesMethod("greedy", "greedy_token_selection")
unconditional_likelihood_normalized = ChoicesMethod("unconditional",
                                                    "unconditional_likelihood_normalized")
METHODS = {m: m for m in ("normalized", "sum", "greedy", "unconditional")}
METHODS.update({m.sglang_name: str(m) for m in (token_length_normalized, greedy_token_selection,
                                                  unconditional_likelihood_normalized)})


def resolve(method) -> str:
    """A method given as one of the objects above or a name -> its short name."""
    if isinstance(method, str) and method in METHODS:
        return METHODS[method]
    raise ValueError(f"unknown choices method {method!r}; use one of "
                     "token_length_normalized, greedy_token_selection, "
                     "unconditional_likelihood_normalized or 'sum'")


def greedy_pick(rows: list, tokens: list) -> int:
    """greedy_token_selection over per-token logprobs ``rows`` (one list per choice, the
    choice's tokens ``tokens``): compare position by position, keeping the choices tied
    at the best value, until one is left; a shorter row continues with its mean.  Two
    choices with the same tokens up to a position are tied there by construction (their
    logprobs may differ in the last bits, computed in different batch rows)."""
    width = max(len(r) for r in rows)
    padded = []
    for r in rows:
        mean = sum(r) / len(r)
        padded.append(list(r) + [mean] * (width - len(r)))
    for i in range(len(rows)):  # the same token prefix -> the same value
        for j in range(min(len(tokens[i]), width)):
            k = next(k for k in range(i + 1) if tokens[k][:j + 1] == tokens[i][:j + 1])
            padded[i][j] = padded[k][j]
    alive = list(range(len(rows)))
    for j in range(width):
        best = max(padded[i][j] for i in alive)
        alive = [i for i in alive if padded[i][j] == best]
        if len(alive) == 1:
            break
    return alive[0]
