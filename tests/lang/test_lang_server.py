"""portaserve.lang against one real server (default model, CPU).  Generations are short
(<= 16 tokens) and greedy where the test compares outputs."""
from __future__ import annotations

import math

import pytest
import requests

import portaserve.lang as pl

GREEDY = {"temperature": 0}


def raw_generate(url, **body):
    r = requests.post(url + "/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def counters(url) -> dict:
    return requests.get(url + "/server_info", timeout=60).json()["counters"]


@pl.function
def chat(s, question):
    s += pl.system("You are a concise assistant.")
    s += pl.user(question)
    s += pl.assistant(pl.gen("first", max_tokens=8, **GREEDY))
    s += pl.user("Now say it in one word.")
    s += pl.assistant(pl.gen("second", max_tokens=4, **GREEDY))


def test_multi_turn_chat_renders_through_the_model_template(backend):
    st = chat.run(question="What is the capital of France?", backend=backend)
    assert st.error is None
    assert st["first"].strip() and st["second"].strip()
    msgs = st.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[1]["content"] == "What is the capital of France?"
    assert msgs[2]["content"] == st["first"] and msgs[4]["content"] == st["second"]
    # the text is exactly what the model's own chat template makes of these messages
    tok = pytest.importorskip("portaserve.models.loader")
    info = backend.model_info
    tokenizer = tok.load_tokenizer(tok.resolve_model_path(info["model_path"]))
    assert st.text() == tokenizer.apply_chat_template(msgs, tokenize=False)
    # the second turn found the first in the radix cache
    assert st.get_meta_info("second")["cached_tokens"] > 0


CHOICES = ["Paris", "London", "the city of Berlin"]


@pl.function
def pick(s, method):
    s += pl.user("What is the capital of France? Answer with the city.")
    s += pl.assistant_begin()
    s += pl.select("city", choices=CHOICES, method=method)


def independent_scores(url, prompt, choices):
    """Mean and total logprob of each choice's tokens from raw /generate, whole prompt
    scored from position 0 (so nothing comes from the radix cache)."""
    n_prompt = raw_generate(url, text=prompt, sampling_params={"max_new_tokens": 0},
                            return_logprob=True, logprob_start_len=0)["meta_info"]["prompt_tokens"]
    means, sums = [], []
    for c in choices:
        out = raw_generate(url, text=prompt + c, sampling_params={"max_new_tokens": 0},
                           return_logprob=True, logprob_start_len=0)
        lps = [e[0] for e in out["meta_info"]["input_token_logprobs"][n_prompt:]]
        assert lps and all(lp is not None for lp in lps)
        sums.append(sum(lps))
        means.append(sum(lps) / len(lps))
    return means, sums


def test_select_picks_the_best_by_independently_computed_scores(backend, server_url):
    st = pick.run(method="normalized", backend=backend)
    chosen = st["city"]
    meta = st.get_meta_info("city")
    prompt = st.text()[:-len(chosen)]
    means, sums = independent_scores(server_url, prompt, CHOICES)
    assert meta["choices"] == CHOICES
    for got, want in zip(meta["normalized_logprobs"], means):
        assert math.isclose(got, want, abs_tol=2e-2), (meta["normalized_logprobs"], means)
    for got, want in zip(meta["logprobs"], sums):
        assert math.isclose(got, want, abs_tol=5e-2), (meta["logprobs"], sums)
    assert chosen == CHOICES[max(range(len(CHOICES)), key=means.__getitem__)]
    assert all(c > 0 for c in meta["cached_tokens"])  # every choice reused the prefilled prompt
    # by total logprob the longest choices are penalised; the pick follows the sums
    st2 = pick.run(method="sum", backend=backend)
    assert st2["city"] == CHOICES[max(range(len(CHOICES)), key=sums.__getitem__)]
    # gen(choices=...) is select
    assert isinstance(pl.gen("x", choices=["a", "b"]), type(pl.select("x", ["a", "b"])))


def test_select_scores_choices_that_merge_with_the_prompt(backend, server_url):
    """A prompt ending in a space: " " + "yes" tokenizes as one token " yes", so a choice's
    tokens start inside the prompt.  Each choice is scored from the first position where
    any choice's tokens part from the prompt's (it used to score nothing there: 0.0, which
    beat every real score, so the first choice always won).  Reference: the tokenizer's
    own ids and raw /generate logprobs from position 0."""
    from portaserve.models.loader import load_tokenizer, resolve_model_path

    prompt = "Q: Is the sky blue? Answer yes or no.\nA: "
    choices = ["no", "yes"]

    @pl.function
    def yn(s):
        s += prompt
        s += pl.select("a", choices=choices, method="sum")

    st = yn.run(backend=backend)
    meta = st.get_meta_info("a")
    tok = load_tokenizer(resolve_model_path(backend.model_info["model_path"]))
    own = tok.encode(prompt)
    ids = [tok.encode(prompt + c) for c in choices]
    assert any(x[len(own) - 1] != own[-1] for x in ids)  # the case under test: a merge
    first = min(next(j for j, (a, b) in enumerate(zip(own, x)) if a != b) for x in ids)
    sums = []
    for c, x in zip(choices, ids):
        lps = raw_generate(server_url, text=prompt + c, sampling_params={"max_new_tokens": 0},
                           return_logprob=True, logprob_start_len=0)["meta_info"]["input_token_logprobs"]
        assert [e[1] for e in lps] == x
        sums.append(sum(e[0] for e in lps[first:]))
    for got, want in zip(meta["logprobs"], sums):
        assert math.isclose(got, want, abs_tol=5e-2), (meta["logprobs"], sums)
    assert all(v < 0 for v in meta["logprobs"])
    assert st["a"] == choices[max(range(2), key=sums.__getitem__)]


def choice_rows(url, prompt, choices):
    """Each choice's token ids and logprobs from raw /generate (whole text scored from
    position 0), from the first position where any choice's tokens part from the prompt's."""
    own = [e[1] for e in raw_generate(url, text=prompt, sampling_params={"max_new_tokens": 0},
                                      return_logprob=True, logprob_start_len=0)
           ["meta_info"]["input_token_logprobs"]]
    full = [raw_generate(url, text=prompt + c, sampling_params={"max_new_tokens": 0},
                         return_logprob=True, logprob_start_len=0)["meta_info"]["input_token_logprobs"]
            for c in choices]
    first = min(next((j for j, (a, b) in enumerate(zip(own, [e[1] for e in f])) if a != b),
                     min(len(own), len(f))) for f in full)
    return [[e[1] for e in f[first:]] for f in full], [[e[0] for e in f[first:]] for f in full]


@pl.function
def pick_by(s, choices, how):
    s += pl.user("What is the capital of France? Answer with the city.")
    s += pl.assistant_begin()
    s += pl.gen("city", choices=choices, choices_method=how)


def test_select_choices_methods_against_raw_logprobs(backend, server_url):
    """SGLang's greedy_token_selection and unconditional_likelihood_normalized, each
    checked against its definition applied to raw /generate logprobs."""
    choices = ["Paris", "The capital is Paris", "Paris, France", "London"]
    st = pick_by.run(choices=choices, how=pl.greedy_token_selection, backend=backend)
    prompt = st.text()[:-len(st["city"])]
    toks, rows = choice_rows(server_url, prompt, choices)
    assert toks[0] == toks[2][:len(toks[0])]  # "Paris" is a token prefix of "Paris, France"
    meta = st.get_meta_info("city")
    assert meta["method"] == "greedy"
    for got, want in zip(meta["token_logprobs"], rows):
        assert len(got) == len(want) and all(math.isclose(a, b, abs_tol=2e-2) for a, b in zip(got, want))
    # the definition: compare position by position, a choice that ends continuing with
    # its own mean; a token prefix shared with another choice is a tie there
    width = max(map(len, rows))
    padded = [r + [sum(r) / len(r)] * (width - len(r)) for r in rows]
    alive = list(range(len(choices)))
    for j in range(width):
        if len({tuple(toks[i][:j + 1]) for i in alive}) == 1 and all(j < len(toks[i]) for i in alive):
            continue  # all alive share this token: tied
        best = max(padded[i][j] for i in alive)
        alive = [i for i in alive if math.isclose(padded[i][j], best, abs_tol=1e-9)]
        if len(alive) == 1:
            break
    assert st["city"] == choices[alive[0]]
    # on this model the three rules pick three different choices, so the test tells them apart
    means = [sum(r) / len(r) for r in rows]
    assert len({alive[0], means.index(max(means)), [sum(r) for r in rows].index(max(map(sum, rows)))}) == 3

    st = pick_by.run(choices=choices, how=pl.unconditional_likelihood_normalized, backend=backend)
    meta = st.get_meta_info("city")
    want = []
    for t, r in zip(toks, rows):
        alone = raw_generate(server_url, input_ids=t, sampling_params={"max_new_tokens": 0},
                             return_logprob=True, logprob_start_len=0)["meta_info"]["input_token_logprobs"]
        assert [e[1] for e in alone] == t and alone[0][0] is None
        want.append(sum(a - (e[0] or 0.0) for a, e in zip(r, alone)) / len(r))
    for got, w in zip(meta["scores"], want):
        assert math.isclose(got, w, abs_tol=3e-2), (meta["scores"], want)
    assert st["city"] == choices[max(range(len(choices)), key=want.__getitem__)]
    assert meta["method"] == "unconditional"


def test_gen_return_logprob_matches_generate(backend, server_url):
    @pl.function
    def ask(s):
        s += pl.user("Name a colour.")
        s += pl.assistant(pl.gen("c", max_tokens=5, return_logprob=True, top_logprobs_num=3, **GREEDY))

    st = ask.run(backend=backend)
    meta = st.get_meta_info("c")
    prompt = st.text()[:st.text().rindex(st["c"])]
    ref = raw_generate(server_url, text=prompt, sampling_params={"max_new_tokens": 5, **GREEDY},
                       return_logprob=True, top_logprobs_num=3)["meta_info"]
    assert [e[1] for e in meta["output_token_logprobs"]] == [e[1] for e in ref["output_token_logprobs"]]
    for a, b in zip(meta["output_token_logprobs"], ref["output_token_logprobs"]):
        assert math.isclose(a[0], b[0], abs_tol=2e-2)
    assert [[e[1] for e in pos] for pos in meta["output_top_logprobs"]] == \
        [[e[1] for e in pos] for pos in ref["output_top_logprobs"]]
    assert all(len(pos) == 3 for pos in meta["output_top_logprobs"])
    # streamed, the last piece carries the whole answer's logprobs
    streamed = ask.run(backend=backend, stream=True)
    "".join(streamed.text_iter())
    assert [e[1] for e in streamed.get_meta_info("c")["output_token_logprobs"]] == \
        [e[1] for e in ref["output_token_logprobs"]]


def test_fork_join_and_variables_read_what_was_queued(backend):
    """concate_and_append appends what each fork added after forking, even if the parent
    grew since (it used to cut at the parent's length at join time, losing the forks'
    text); and reading a variable waits for its last queued assignment (it returned the
    first of two)."""
    @pl.function
    def prog(s):
        s += "Colors:"
        forks = s.fork(2)
        s += " PARENT"
        forks[0] += " red"
        forks[1] += " blue"
        forks.join("concate_and_append")

    assert prog.run(backend=backend).text() == "Colors: PARENT red blue"

    seen = {}

    @pl.function
    def twice(s):
        s += "1, 2, 3,"
        s += pl.gen("a", max_tokens=2, **GREEDY)
        s += " then"
        s += pl.gen("a", max_tokens=6, **GREEDY)
        seen["a"] = s["a"]  # read while both gens are queued

    st = twice.run(backend=backend)
    assert seen["a"] == st["a"] and st.text().endswith("then" + st["a"])


@pl.function
def branches(s):
    s += pl.system("You are a creative assistant. " * 4)
    s += pl.user("Suggest a name for a cat.")
    forks = s.fork(3)
    for i, f in enumerate(forks):
        f += pl.assistant(pl.gen("name", max_tokens=6, temperature=0.8, sampling_seed=i))
    forks.join()
    s += pl.user("Thanks.")


def test_fork_join_branches_hit_the_cache(backend):
    st = branches.run(backend=backend)
    names = st["name"]
    assert isinstance(names, list) and len(names) == 3 and all(isinstance(n, str) for n in names)
    metas = st.get_meta_info("name")
    for m in metas:
        # the fork prefilled the shared prefix once: each branch only computes its tail
        assert m["cached_tokens"] > 0
        assert m["prompt_tokens"] - m["cached_tokens"] <= 8, m
    assert st.text().endswith("Thanks.<|im_end|>\n")
    assert "Suggest a name for a cat." in st.text()


def test_fork_concate_and_append(backend):
    @pl.function
    def prog(s):
        s += "Colors: "
        forks = s.fork(2)
        forks[0] += "red"
        forks[1] += ", blue"
        forks.join("concate_and_append")
    assert prog.run(backend=backend).text() == "Colors: red, blue"


@pl.function
def structured(s):
    s += pl.user("Give me a US phone number and your age.")
    s += pl.assistant_begin()
    s += "Phone: " + pl.gen("phone", max_tokens=16, regex=r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", **GREEDY)
    s += "\nAge: " + pl.gen("age", max_tokens=6, dtype=int, **GREEDY)
    s += "\nJSON: " + pl.gen("obj", max_tokens=32, json_schema={
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
        "additionalProperties": False}, **GREEDY)
    s += pl.assistant_end()


def test_regex_int_and_json_constrained_gen(backend):
    import json
    import re

    st = structured.run(backend=backend)
    assert re.fullmatch(r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", st["phone"]), st["phone"]
    assert isinstance(st["age"], int)
    assert isinstance(json.loads(st["obj"])["ok"], bool)
    assert "Phone: " + st["phone"] + "\nAge: " in st.text()


@pl.function
def short(s, i):
    s += pl.user(f"Say a word that starts with the letter {chr(65 + i)}.")
    s += pl.assistant(pl.gen("word", max_tokens=8, **GREEDY))


def test_run_batch_of_16_runs_concurrently(backend, server_url):
    before = counters(server_url)
    states = short.run_batch([{"i": i} for i in range(16)], backend=backend, num_threads=16)
    after = counters(server_url)
    assert len(states) == 16 and all(s.error is None for s in states)
    for i, s in enumerate(states):
        assert f"letter {chr(65 + i)}." in s.text()  # results come back in order
        assert s["word"].strip()
    completion = sum(s.get_meta_info("word")["completion_tokens"] for s in states)
    decode_steps = after["forward_decode"] - before["forward_decode"]
    # one by one this would take one decode step per token; batched it takes far fewer
    assert decode_steps < completion / 2, (decode_steps, completion)


def test_streaming_gen(backend):
    @pl.function
    def story(s):
        s += pl.user("Tell me a story about a dragon.")
        s += pl.assistant(pl.gen("story", max_tokens=10, **GREEDY))

    st = story.run(backend=backend, stream=True)
    pieces = list(st.text_iter("story"))
    assert len(pieces) >= 3, pieces
    assert "".join(pieces) == st["story"]
    assert "".join(st.text_iter()) == st.text()
    assert st["story"] == story.run(backend=backend)["story"]  # same greedy text


def test_errors_carry_the_server_message_and_leave_the_state_readable(backend):
    @pl.function
    def bad(s):
        s += pl.user("Hi")
        s += pl.assistant(pl.gen("ok", max_tokens=4, **GREEDY))
        s += pl.gen("broken", max_tokens=4, top_p=3.0)
        s += "never appended"

    with pytest.raises(pl.LangError, match=r"top_p must be <= 1.0") as ei:
        bad.run(backend=backend)
    e = ei.value
    assert e.status == 400
    st = e.state
    assert st["ok"] and st.text().endswith(st["ok"] + "<|im_end|>\n")
    assert "never appended" not in st.text()
    with pytest.raises(pl.LangError, match="top_p"):
        st["broken"]

    # an error inside a fork surfaces at join, with the server's message
    @pl.function
    def bad_fork(s):
        s += "Answer: "
        forks = s.fork(2)
        forks[0] += pl.gen("a", max_tokens=2)
        forks[1] += pl.gen("a", max_tokens=2, regex="[unclosed")
        forks.join()

    with pytest.raises(pl.LangError, match="regex"):
        bad_fork.run(backend=backend)
    # run_batch keeps going and marks the failed states
    states = bad.run_batch([{}, {}], backend=backend)
    assert all(isinstance(s.error, pl.LangError) for s in states)
    with pytest.raises(pl.LangError, match="failed"):
        pl.RuntimeEndpoint("http://127.0.0.1:9", timeout=5)


def test_in_process_runtime_backend_matches_the_server(backend):
    rt = pl.Runtime(max_total_tokens=4000)
    try:
        local = short.run(i=3, backend=rt)
        remote = short.run(i=3, backend=backend)
        assert local.text() == remote.text()
        p_local = pick.run(method="normalized", backend=rt)
        p_remote = pick.run(method="normalized", backend=backend)
        assert p_local["city"] == p_remote["city"]
        for a, b in zip(p_local.get_meta_info("city")["normalized_logprobs"],
                        p_remote.get_meta_info("city")["normalized_logprobs"]):
            assert math.isclose(a, b, abs_tol=2e-2)
        for how in (pl.greedy_token_selection, pl.unconditional_likelihood_normalized):
            a = pick_by.run(choices=CHOICES, how=how, backend=rt)
            b = pick_by.run(choices=CHOICES, how=how, backend=backend)
            assert a["city"] == b["city"]
            for x, y in zip(a.get_meta_info("city")["normalized_logprobs"],
                            b.get_meta_info("city")["normalized_logprobs"]):
                assert math.isclose(x, y, abs_tol=2e-2)
        with pytest.raises(pl.LangError, match="top_p"):
            pl.function(lambda s: s.__iadd__("Hi" + pl.gen("x", top_p=3.0))).run(backend=rt)
    finally:
        rt.shutdown()
