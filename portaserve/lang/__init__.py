"""portaserve.lang: multi-call LLM programs as plain Python (SGLang's frontend language).

    import portaserve.lang as pl

    @pl.function
    def qa(s, question):
        s += pl.user(question)
        s += pl.assistant(pl.gen("answer", max_tokens=64))

    pl.set_default_backend(pl.RuntimeEndpoint("http://127.0.0.1:30000"))
    state = qa.run(question="What is 2 + 2?")
    state["answer"], state.text(), state.messages()
"""
from portaserve.lang.api import (Program, assistant, assistant_begin, assistant_end, function, gen,
                                 gen_float, gen_int, get_default_backend, select,
                                 set_default_backend, system, system_begin, system_end, user,
                                 user_begin, user_end)
from portaserve.lang.backends import Backend, Runtime, RuntimeEndpoint
from portaserve.lang.chat_template import ChatTemplate
from portaserve.lang.choices import (greedy_token_selection, token_length_normalized,
                                     unconditional_likelihood_normalized)
from portaserve.lang.errors import LangError
from portaserve.lang.state import ForkGroup, ProgramState

__all__ = ["function", "gen", "gen_int", "gen_float", "select", "system", "user", "assistant",
           "system_begin", "system_end", "user_begin", "user_end", "assistant_begin",
           "assistant_end", "set_default_backend", "get_default_backend", "Program",
           "Backend", "Runtime", "RuntimeEndpoint", "ChatTemplate", "LangError", "ProgramState",
           "ForkGroup", "token_length_normalized", "greedy_token_selection",
           "unconditional_likelihood_normalized"]
