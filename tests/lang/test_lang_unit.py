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
