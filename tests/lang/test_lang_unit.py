"""portaserve.lang pieces that need no model: IR, chat-template affixes, a fake backend."""
from __future__ import annotations

import threading
import time

import pytest

import portaserve.lang as pl
from portaserve.lang.backends.base import Backend
from portaserve.lang.chat_template import ChatTemplate, plain
from portaserve.lang.ir import REGEX_INT

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
          "'<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}")
SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nDefault<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
        "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}")


@pytest.mark.parametrize("source", [CHATML, LLAMA3, SMOL])
def test_affixes_rebuild_the_template_rendering(source):
    t = ChatTemplate.from_jinja(source, bos_token="<s>")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"}]
    text, hist = "", []
    for m in msgs:
        pre, suf = t.affixes(m["role"], hist)
        text += pre + m["content"] + suf
        hist.append(m)
    # what an empty conversation renders (the BOS token) is the tokenizer's job, not the text's
    assert t._render(msgs) == t._render_or_empty([]) + text


def test_plain_template_and_gen_arguments():
    assert plain().affixes("user", []) == ("User: ", "\n")
    g = pl.gen("n", max_tokens=5, dtype=int, stop=["\n"])
    assert g.sampling == {"max_new_tokens": 5, "stop": ["\n"], "regex": REGEX_INT}
    assert pl.gen("j", json_schema={"type": "object"}).sampling["json_schema"] == '{"type": "object"}'
    with pytest.raises(TypeError):
        pl.gen("x", nonsense=1)
    with pytest.raises(ValueError):
        pl.select("x", choices=[])
    with pytest.raises(ValueError):
        pl.gen("x", dtype=list)


def test_select_arguments_and_run_batch_refuse_what_they_cannot_honour():
    assert pl.select("x", ["a"], choices_method=pl.greedy_token_selection).method == "greedy"
    assert pl.select("x", ["a"], choices_method="unconditional_likelihood_normalized").method == "unconditional"
    assert pl.select("x", ["a"], method="sum").method == "sum"
    assert pl.gen("x", choices=["a"], choices_method=pl.greedy_token_selection).method == "greedy"
    assert repr(pl.token_length_normalized) == "token_length_normalized"
    with pytest.raises(ValueError, match="unknown choices method"):
        pl.select("x", ["a"], choices_method="best")
    with pytest.raises(ValueError, match="temperature"):
        pl.select("x", ["a"], temperature=0.5)
    with pytest.raises(ValueError, match="choices_method='sum'"):  # the old positional method
        pl.select("x", ["a"], "sum")
    with pytest.raises(ValueError, match="choices_method goes with choices"):
        pl.gen("x", choices_method=pl.greedy_token_selection)
    with pytest.raises(ValueError, match="return_logprob"):
        pl.gen("x", top_logprobs_num=2)
    assert pl.gen("x", return_logprob=True, top_logprobs_num=2).logprob["top_logprobs_num"] == 2

    @pl.function
    def prog(s):
        s += "x"

    with pytest.raises(TypeError, match="unknown keyword arguments \\['temprature'\\]"):
        prog.run_batch([{}], backend=EchoBackend(0), temprature=0.5)

    @pl.function
    def takes_stop(s, stop):  # a program argument named like a sampling parameter
        s += stop

    states = takes_stop.run_batch([{"stop": "!"}], backend=EchoBackend(0), stop=["\n"])
    assert states[0].text() == "!"


def test_greedy_pick_is_the_position_by_position_maximum():
    """Against the definition written out another way: the lexicographic maximum of the
    rows padded with their means (no shared tokens, so no ties)."""
    import random

    from portaserve.lang.choices import greedy_pick

    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 5)
        rows = [[-rng.choice([0.5, 1.0, 1.5, 2.0]) for _ in range(rng.randint(1, 4))] for _ in range(n)]
        toks = [[100 * i + j for j in range(len(r))] for i, r in enumerate(rows)]
        width = max(map(len, rows))
        padded = [r + [sum(r) / len(r)] * (width - len(r)) for r in rows]
        assert greedy_pick(rows, toks) == max(range(n), key=lambda i: padded[i])
    # a shared first token is a tie even when its two logprobs differ in the last bits:
    # the second token decides
    assert greedy_pick([[-1.0, -3.0], [-1.0 + 1e-7, -5.0], [-2.0]], [[5, 6], [5, 7], [8]]) == 0


class EchoBackend(Backend):
    """Generates "<n>" where n counts calls; slow, to show forks run concurrently."""

    def __init__(self, delay=0.2):
        self.delay, self.calls, self.active, self.peak = delay, 0, 0, 0
        self.lock = threading.Lock()

    def generate(self, text, sampling_params, *, return_logprob=False, logprob_start_len=None,
                 stream=False):
        with self.lock:
            self.calls += 1
            n = self.calls
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(self.delay)
        with self.lock:
            self.active -= 1
        out = {"text": f"<{n}>", "output_ids": [], "meta_info": {"prompt_tokens": len(text),
                                                                  "cached_tokens": 0}}
        return iter([out]) if stream else out

    def chat_template(self):
        return plain()


def test_forks_run_concurrently_and_join_gathers():
    be = EchoBackend()

    @pl.function
    def prog(s):
        s += pl.user("q")
        forks = s.fork(4)
        for f in forks:
            f += pl.assistant(pl.gen("a"))
        forks.join()

    st = prog.run(backend=be)
    assert be.peak == 4  # 4 branches in flight at once (after 1 prefix fill)
    assert sorted(st["a"]) == sorted(f"<{i}>" for i in range(2, 6))
    assert st.text() == "User: q\n"


def test_program_errors_without_a_backend_and_unbalanced_roles():
    pl.set_default_backend(None)

    @pl.function
    def prog(s):
        s += pl.user_end()

    with pytest.raises(RuntimeError, match="no backend"):
        prog.run()
    with pytest.raises(pl.LangError, match="without a matching"):
        prog.run(backend=EchoBackend(0))
