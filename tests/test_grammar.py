"""Structured output at decode time (xgrammar): every sampled output validates."""
from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest

from portaserve.core.sampling_params import InvalidRequest

N = 50  # requests per constraint kind, temperature 1.0

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1.5, "maximum": 99.5},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "score", "role", "address", "tags", "active"],
    "additionalProperties": False,
}

IP = r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"

ARITH = r'''
root ::= expr
expr ::= term | term op term | term op term op term
term ::= num | "(" num op num ")"
op ::= " + " | " - " | " * "
num ::= [1-9] | [1-9] [0-9]
'''


def parse_arith(s: str) -> bool:
    """An independent recursive-descent parser of the ARITH language."""
    pos = 0

    def num():
        nonlocal pos
        m = re.compile(r"[1-9][0-9]?").match(s, pos)
        if not m:
            return False
        pos = m.end()
        return True

    def op():
        nonlocal pos
        for o in (" + ", " - ", " * "):
            if s.startswith(o, pos):
                pos += 3
                return True
        return False

    def term():
        nonlocal pos
        if s.startswith("(", pos):
            pos += 1
            if not (num() and op() and num()) or not s.startswith(")", pos):
                return False
            pos += 1
            return True
        return num()

    if not term():
        return False
    for _ in range(2):
        save = pos
        if not op():
            break
        if not term():
            pos = save
            return False
    return pos == len(s)


def _run(engine, prompt, key, value, n=N, max_new=160, **extra):
    sps = [{"max_new_tokens": max_new, "temperature": 1.0, key: value, "sampling_seed": i, **extra}
           for i in range(n)]
    return engine.generate([prompt] * n, sps)


def _finished_by_grammar(out):
    return out["meta_info"]["finish_reason"]["type"] == "stop"


def test_json_schema_outputs_validate(default_engine):
    outs = _run(default_engine, "Describe a user as JSON:", "json_schema", json.dumps(PERSON_SCHEMA))
    for o in outs:
        assert _finished_by_grammar(o), o
        jsonschema.validate(json.loads(o["text"]), PERSON_SCHEMA)


@pytest.mark.parametrize("pattern,prompt", [(IP, "The server's IP address is "), (DATE, "Today's date is ")])
def test_regex_outputs_fullmatch(default_engine, pattern, prompt):
    outs = _run(default_engine, prompt, "regex", pattern, max_new=40)
    for o in outs:
        assert _finished_by_grammar(o), o
        assert re.fullmatch(pattern, o["text"]), o["text"]


def test_ebnf_outputs_parse(default_engine):
    outs = _run(default_engine, "Write an arithmetic expression: ", "ebnf", ARITH, max_new=60)
    assert parse_arith("(3 + 4) * 12") and not parse_arith("3 +") and not parse_arith("03")
    for o in outs:
        assert _finished_by_grammar(o), o
        assert parse_arith(o["text"]), o["text"]


def test_mixed_batch_leaves_free_requests_untouched(default_engine):
    free = ["The capital of France is", "1, 2, 3, 4, 5,", "Once upon a time"]
    greedy = {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True}
    alone = default_engine.generate(free, greedy)
    mixed = default_engine.generate(
        free + ["Give JSON:", "IP: "],
        [greedy] * 3 + [{"max_new_tokens": 120, "temperature": 1.0, "json_schema": json.dumps(PERSON_SCHEMA)},
                        {"max_new_tokens": 30, "temperature": 1.0, "regex": IP}])
    assert [o["output_ids"] for o in mixed[:3]] == [o["output_ids"] for o in alone]
    jsonschema.validate(json.loads(mixed[3]["text"]), PERSON_SCHEMA)
    assert re.fullmatch(IP, mixed[4]["text"])


def test_jump_forward_saves_decode_steps_and_stays_valid():
    from portaserve import Engine

    schema = json.dumps(PERSON_SCHEMA)
    results = {}
    for jf in (True, False):
        with Engine(max_total_tokens=8192, jump_forward="on" if jf else "off") as e:
            outs = _run(e, "Describe a user as JSON:", "json_schema", schema, n=8)
            c = e.get_server_info()["counters"]
            for o in outs:
                jsonschema.validate(json.loads(o["text"]), PERSON_SCHEMA)
            results[jf] = c
    assert results[False]["jump_forward_tokens"] == 0
    assert results[True]["jump_forward_tokens"] > 8 * 10  # keys and punctuation of 7+2 fields
    # fewer decode passes with jump-forward, for the same number of requests
    assert results[True]["forward_decode"] < results[False]["forward_decode"]


@pytest.mark.parametrize("sp,param,msg", [
    ({"json_schema": "{not json"}, "json_schema", "not valid JSON"),
    ({"json_schema": '{"type": "objekt"}'}, "json_schema", "Unsupported type"),
    ({"regex": "([a-z"}, "regex", "Unclosed"),
    ({"ebnf": "root ::= undefined_rule"}, "ebnf", "not defined"),
    ({"regex": "a+", "json_schema": "{}"}, "regex", "only one of"),
    # valid, but traps for jump-forward: no finite match, or a forced text too long
    ({"json_schema": json.dumps({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]})},
     "json_schema", "matches no finite text"),
    ({"json_schema": {"type": "array", "items": {"$ref": "#"}, "minItems": 1}}, "json_schema",
     "matches no finite text"),
    ({"ebnf": 'root ::= "b" | "a" x\nx ::= "x" x'}, "ebnf", "rule x recurses without a way out"),
    ({"regex": "a{20000000}"}, "regex", "20000000 characters"),
    ({"regex": "(ab{1000}){1000}"}, "regex", "1001000 characters"),
    ({"regex": "a{200000,200005}b"}, "regex", "forces a text of 200000 characters"),
    ({"json_schema": {"const": "x" * 150000}}, "json_schema", "forces a text of 150002"),
    ({"json_schema": {"enum": ["x" * (1 << 20)]}}, "json_schema", "more than the 1048576 allowed"),
])
def test_invalid_constraints_are_refused(default_engine, sp, param, msg):
    with pytest.raises(InvalidRequest) as ei:
        default_engine.generate("x", sp)
    assert msg in str(ei.value)
    assert ei.value.param in (param, "json_schema")


@pytest.mark.parametrize("jump_forward", [True, False])
def test_overlap_scheduler_runs_constrained_requests(default_engine, monkeypatch, jump_forward):
    """Constrained requests in the overlapped decode loop (batch N+1 launched before N's
    tokens are read; N+1's masks filled after the matchers accepted N's tokens) give the
    same tokens and finish reasons as the plain loop, jump-forward included.  On the CPU
    the loop runs synchronously, which still exercises its bookkeeping: requests that
    finish or jump forward at N while N+1 is launched, seeded draws of ignored rows."""
    sched = default_engine.rt.scheduler
    schema = json.dumps(PERSON_SCHEMA)
    prompts = ["Describe a user as JSON:"] * 4 + ["The server's IP address is ", "Today's date is ",
                                                  "Write an arithmetic expression: ", "The capital of France is",
                                                  "1, 2, 3, 4, 5,"]
    sps = ([{"max_new_tokens": 160, "temperature": t, "json_schema": schema, "sampling_seed": i}
            for i, t in enumerate((0.0, 1.0, 1.0, 1.0))]
           + [{"max_new_tokens": 40, "temperature": 1.0, "regex": IP, "sampling_seed": 7},
              {"max_new_tokens": 40, "temperature": 0.0, "regex": DATE},
              {"max_new_tokens": 60, "temperature": 1.0, "ebnf": ARITH, "sampling_seed": 9},
              {"max_new_tokens": 25, "temperature": 0.0, "ignore_eos": True},
              {"max_new_tokens": 50, "temperature": 1.0, "sampling_seed": 11}])
    launched = []  # (overlap, constrained rows in the launched batch)
    real = sched._launch_sampling

    def spy(batch, logits, *kind):
        launched.append(sum(r.grammar is not None for r in batch))
        return real(batch, logits, *kind)

    monkeypatch.setattr(sched, "_launch_sampling", spy)
    monkeypatch.setattr(sched, "jump_forward", jump_forward)
    results, jf_tokens = {}, {}
    for overlap in (False, True):
        monkeypatch.setattr(sched, "overlap", overlap)
        launched.clear()
        assert default_engine.flush_cache()
        before = sched.counters.jump_forward_tokens
        results[overlap] = default_engine.generate(prompts, sps)
        jf_tokens[overlap] = sched.counters.jump_forward_tokens - before
        assert bool(launched) == overlap and (not overlap or max(launched) >= 4)
        assert default_engine.flush_cache()
        kv = default_engine.get_server_info()["kv"]
        assert kv["free"] == kv["max_total_tokens"]
    plain, over = results[False], results[True]
    assert [o["output_ids"] for o in over] == [o["output_ids"] for o in plain]
    assert [o["meta_info"]["finish_reason"] for o in over] == [o["meta_info"]["finish_reason"] for o in plain]
    assert jf_tokens[True] == jf_tokens[False] and (jf_tokens[True] > 0) == jump_forward
    for o in over[:4]:
        assert _finished_by_grammar(o), o
        jsonschema.validate(json.loads(o["text"]), PERSON_SCHEMA)
    assert re.fullmatch(IP, over[4]["text"]) and re.fullmatch(DATE, over[5]["text"])
    assert parse_arith(over[6]["text"]), over[6]["text"]
    assert over[7]["meta_info"]["completion_tokens"] == 25


def test_parallel_mask_fill_equals_one_by_one(default_engine):
    """The batched, multi-threaded mask fill gives exactly the per-matcher masks, for
    matchers in different states of different grammars."""
    import torch

    backend = default_engine.rt.scheduler.grammar
    tok = default_engine.tokenizer
    grammars = [("json_schema", json.dumps(PERSON_SCHEMA)), ("regex", r"(\d{1,3}\.){3}\d{1,3}"),
                ("ebnf", 'root ::= "yes" | "no" | "maybe " [a-z]+')]
    prefixes = ['{"name": "Al', "192.16", "maybe x"]
    matchers, rows = [], []
    for i, ((kind, text), pre) in enumerate(zip(grammars * 2, prefixes * 2)):
        m = backend.matcher(backend.compile(kind, text).result())
        if i >= 3:  # the second copy advanced by a prefix, the first one fresh
            for t in tok.encode(pre, add_special_tokens=False):
                assert m.accept_token(t)
        matchers.append(m)
        rows.append(2 * i)  # not contiguous: rows of a larger batch
    one = backend.xgr.allocate_token_bitmask(12, backend.vocab_size)
    for r, m in zip(rows, matchers):
        m.fill_next_token_bitmask(one, r)
    threads = backend.mask_threads
    try:
        backend.mask_threads = 4
        got = backend.fill_masks(12, rows, matchers)
    finally:
        backend.mask_threads = threads
    assert backend._batch_matcher is not None
    assert torch.equal(got.bitmask, one)


def test_json_masks_bar_raw_control_characters(default_engine):
    """Inside a length-bounded JSON string (maxLength) xgrammar's mask lets through
    tokens that carry a raw control character (a TAB glued to a word), which strict JSON
    parsers reject; the backend removes them from JSON matchers' masks."""
    backend = default_engine.rt.scheduler.grammar
    schema = json.dumps({"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                         "required": ["city"]})
    compiled = backend.compile("json_schema", schema).result()
    ctrl = [i for i, b in enumerate(backend.info.decoded_vocab) if any(c < 0x20 for c in b)]

    def allowed(m):
        assert m.accept_string('{"city": "Yang')
        mask = backend.fill_masks(1, [0], [m]).bitmask[0]
        return {i for i in ctrl if (int(mask[i // 32]) >> (i % 32)) & 1}

    unfiltered = allowed(backend.matcher(compiled))  # kind unknown: xgrammar's own mask
    assert unfiltered, "xgrammar no longer admits control characters in strings: drop the filter"
    assert allowed(backend.matcher(compiled, "json_schema")) == set()


def test_jump_forward_policy_follows_the_flag_and_graphs(default_engine):
    from portaserve.runtime import jump_forward_mode
    from portaserve.server_args import ServerArgs

    assert default_engine.get_server_info()["jump_forward"] == "on"  # auto, no graphs on the CPU
    for mode, graphs, want in [("auto", False, "on"), ("auto", True, "off"), ("on", True, "on"),
                               ("off", False, "off"), ("whole-batch", True, "whole-batch"),
                               ("whole-batch", False, "whole-batch")]:
        assert jump_forward_mode(ServerArgs(jump_forward=mode), graphs) == want, (mode, graphs)
    assert jump_forward_mode(ServerArgs(disable_jump_forward=True), False) == "off"
    import argparse

    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    assert ServerArgs.from_cli(p.parse_args(["--jump-forward", "on"])).jump_forward == "on"
    with pytest.raises(SystemExit):
        p.parse_args(["--jump-forward", "sometimes"])
    with pytest.raises(ValueError, match="jump-forward 'wholebatch': choose from"):
        ServerArgs(jump_forward="wholebatch").validate()  # Engine(**kwargs) bypasses argparse


def test_whole_batch_jump_forward_waits_for_the_whole_batch(default_engine, monkeypatch):
    """--jump-forward whole-batch (for single streams on GPUs): a lone constrained request
    jumps; one running beside a free request never does (its jump would break the graphed decode
    step of the other), and both ways the output still validates.  (The tokens differ:
    a jump appends the forced text as the tokenizer splits it.)"""
    sched = default_engine.rt.scheduler
    monkeypatch.setattr(sched, "jump_whole_batch", True)
    schema = json.dumps(PERSON_SCHEMA)
    sp = {"max_new_tokens": 120, "temperature": 0, "json_schema": schema}
    before = sched.counters.jump_forward_tokens
    alone = default_engine.generate("Describe a user as JSON:", sp)
    jumped_alone = sched.counters.jump_forward_tokens - before
    jsonschema.validate(json.loads(alone["text"]), PERSON_SCHEMA)
    assert jumped_alone > 10
    before = sched.counters.jump_forward_tokens
    outs = default_engine.generate(["Describe a user as JSON:", "Once upon a time"],
                                   [sp, {"max_new_tokens": 200, "temperature": 0, "ignore_eos": True}])
    assert sched.counters.jump_forward_tokens == before  # the free request outlives the JSON one
    jsonschema.validate(json.loads(outs[0]["text"]), PERSON_SCHEMA)


def _brute_shortest(kind: str, text: str, alphabet: str, depth: int):
    """Length of the shortest text the constraint accepts, by breadth-first search over
    one-character tokens with xgrammar's own matcher (None if none up to depth)."""
    import xgrammar as xgr

    vocab = list(alphabet) + ["</s>"]
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, stop_token_ids=[len(vocab) - 1])
    comp = xgr.GrammarCompiler(info)
    compiled = (comp.compile_regex(text) if kind == "regex" else comp.compile_grammar(text))
    frontier = [xgr.GrammarMatcher(compiled)]
    for n in range(depth + 1):
        nxt = []
        for m in frontier:
            end = m.fork()
            if end.accept_token(len(vocab) - 1):
                return n
            for t in range(len(alphabet)):
                f = m.fork()
                if f.accept_token(t):
                    nxt.append(f)
        frontier = nxt[:2000]
    return None


@pytest.mark.parametrize("kind,text", [
    ("regex", "ab{3}(c|dd)*e?"), ("regex", "(ab|c){2,4}d+"), ("regex", "a?b?"),
    ("ebnf", 'root ::= "a" root "b" | "cd"'), ("ebnf", 'root ::= x x\nx ::= "a" x | y\ny ::= "b"{2}'),
    ("ebnf", 'root ::= ("a" | "bb")+ [c-d]{3,5}'),
])
def test_grammar_shortest_text_matches_a_brute_force_search(kind, text):
    """The bound the refusal uses (grammar_bounds.shortest, read from xgrammar's printed
    grammar) equals the shortest text xgrammar's matcher accepts, found by search."""
    import xgrammar as xgr

    from portaserve.core import grammar_bounds

    g = xgr.Grammar.from_regex(text) if kind == "regex" else xgr.Grammar.from_ebnf(text)
    rules = grammar_bounds.parse(str(g))
    assert rules is not None, str(g)
    assert grammar_bounds.shortest(rules)["root"] == _brute_shortest(kind, text, "abcde", 12)


def test_grammar_shortest_is_linear_in_the_grammar(monkeypatch):
    """A regex of n alternatives prints as a root of n groups over n rules.  The worklist
    computed the root again each time one of its rules got shorter: ~n^2 element visits, and
    a 75 KB regex of 4,000 alternatives held the request-building thread for 144 s (a single
    request stalled every other).  Seeded in dependency order, each element is visited a
    bounded number of times; the lengths still match a reference computed by recursion."""
    import functools

    import xgrammar as xgr

    from portaserve.core import grammar_bounds

    n = 2000
    g = xgr.Grammar.from_regex("(" + "|".join(f"w{i}[a-z]{{{1 + i % 3},5}}" for i in range(n)) + ")")
    rules = grammar_bounds.parse(str(g))
    visits = [0]
    real = grammar_bounds._elem_len

    def counted(e, best):
        visits[0] += 1
        return real(e, best)

    monkeypatch.setattr(grammar_bounds, "_elem_len", counted)
    best = grammar_bounds.shortest(rules)
    def size(alts):  # elements, nested groups' included
        return sum(1 + (size(e[0][1]) if e[0][0] == "group" else 0) for seq in alts for e in seq)

    elements = sum(size(alts) for alts in rules.values())
    assert visits[0] <= 2 * elements, (visits[0], elements)

    @functools.lru_cache(None)  # the grammar is acyclic: plain recursion is the reference
    def ref(name):
        def alts_len(alts):
            return min(sum(elem_len(e) for e in seq) for seq in alts)

        def elem_len(e):
            (kind, val), (lo, _) = e
            one = alts_len(val) if kind == "group" else ref(val) if kind == "rule" else val
            return one * lo
        return alts_len(rules[name])

    assert best == {r: ref(r) for r in best}
    assert best["root"] == min(len(f"w{i}") + 1 + i % 3 for i in range(n)) == 3


def test_min_new_tokens_gives_way_to_a_finished_grammar(default_engine):
    """min_new_tokens bars the end of the answer, but not where the grammar allows only the
    end: the request stops there (it was aborted with 'grammar rejected token 0').  Before
    the grammar is done, the minimum still holds (the model is kept from stopping)."""
    e = default_engine
    out = e.generate("Say a:", {"regex": "a", "min_new_tokens": 5, "max_new_tokens": 8, "temperature": 0})
    assert out["text"] == "a" and out["meta_info"]["finish_reason"]["type"] == "stop", out["meta_info"]
    out = e.generate("Name:", {"regex": "[a-z]{1,20}", "min_new_tokens": 6, "max_new_tokens": 40,
                               "temperature": 0})
    assert re.fullmatch("[a-z]{1,20}", out["text"]) and out["meta_info"]["finish_reason"]["type"] == "stop"
    assert len(out["output_ids"]) >= 6 or len(out["text"]) == 20  # the minimum, or the grammar's end


@pytest.mark.parametrize("kind,value", [
    # long but free (nothing forced), or short with a long optional branch: accepted
    ("regex", "[a-z]{100001}"), ("regex", ".{100001}"),
    ("json_schema", {"type": "string", "minLength": 100001}),
    ("json_schema", {"type": "array", "items": {"type": "integer"}, "minItems": 50001}),
    ("json_schema", {"type": "object", "properties": {"a": {"anyOf": [
        {"type": "null"}, {"type": "string", "minLength": 200000}]}}}),
    ("json_schema", {"type": "object", "properties": {"a": {"$ref": "#"}}}),  # recursion with a way out
    ("ebnf", 'root ::= "a" root | "b"'),
])
def test_long_or_recursive_constraints_that_force_nothing_are_accepted(kind, value):
    from portaserve.core.grammar import validate_constraint

    validate_constraint(kind, value if isinstance(value, str) else json.dumps(value))


def test_a_chain_of_thousands_of_refs_is_checked_without_crashing():
    """xgrammar converts a $ref chain recursively in C++: 4,000 links overflowed an 8 MB
    thread stack (a segfault that took the server down).  The check and the compile run on
    threads with deep stacks; the check itself is linear (a worklist, not rounds)."""
    import subprocess
    import sys

    code = """
import json
from portaserve.core.grammar import validate_constraint
n = 8000
defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i+1}"}}, "required": ["x"]}
        for i in range(n)}
defs[f"d{n}"] = {"type": "integer"}
validate_constraint("json_schema", json.dumps({"$defs": defs, "$ref": "#/$defs/d0"}))
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


def test_stop_strings_inside_forced_text_and_after_min_new_tokens(default_engine):
    """Found by review: jump-forward appended forced tokens without the stop checks, so a
    stop string inside a forced text was missed; and with min_new_tokens, the text was
    cut at the first occurrence of the stop string (one before min_new_tokens, which does
    not count), so streamed and whole answers differed."""
    e = default_engine
    # the regex forces the whole sentence: the stop string must end it where it appears
    out = e.generate("Q:", {"regex": "The answer is written after this sentence, yes", "stop": ["answer"],
                            "temperature": 0, "max_new_tokens": 40})
    assert out["text"] == "The " and out["meta_info"]["finish_reason"]["matched"] == "answer", out
    # a stop string ending in a character split over several tokens (the emoji is three
    # byte tokens here): without its last token, the character decodes as U+FFFD
    assert len(e.tokenizer.encode("🎉", add_special_tokens=False)) > 1
    for jf in (True, False):
        e.rt.scheduler.jump_forward = jf
        try:
            out = e.generate("Q:", {"regex": "Party 🎉 time and more text here", "stop": ["🎉"],
                                    "temperature": 0, "max_new_tokens": 40})
        finally:
            e.rt.scheduler.jump_forward = True
        assert out["text"] == "Party " and out["meta_info"]["finish_reason"]["matched"] == "🎉", (jf, out)

    # reference: the same greedy tokens without stop strings, cut by the rule written out
    tok = e.tokenizer
    for mn in (6, 12):  # 6: a newline right before min_new_tokens is in the stop check's window
        _check_min_new_tokens_stop(e, tok, "List:\n1. apples\n2.", mn)


def _check_min_new_tokens_stop(e, tok, prompt, mn):
    # (min_new_tokens bars the end-of-sequence token until then, so the reference has it too)
    ref = e.generate(prompt, {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True,
                              "min_new_tokens": mn})["output_ids"]
    texts = [tok.decode(ref[:k], skip_special_tokens=True) for k in range(len(ref) + 1)]
    k = next(k for k in range(mn + 1, len(ref) + 1) if "\n" in texts[k][max(0, len(texts[k - 1])):])
    want = texts[k][:texts[k].index("\n", len(texts[k - 1]))]
    assert "\n" in want  # an earlier newline (before min_new_tokens) stays: the case under test
    sp = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True, "stop": ["\n"], "min_new_tokens": mn}
    whole = e.generate(prompt, sp)
    assert whole["text"] == want and len(whole["output_ids"]) == k, (whole["text"], want)
    streamed = list(e.generate(prompt, sp, stream=True))
    assert streamed[-1]["text"] == want


def test_compiled_constraint_cache_is_bounded(default_engine, monkeypatch):
    """Found by review: every distinct schema stayed compiled for good (a server taking a
    schema per request grew without end).  The most recently used are kept."""
    g = default_engine.rt.scheduler.grammar
    monkeypatch.setattr(type(g), "CACHE_ENTRIES", 4)
    first = g.compile("regex", "a{1,1}")
    for i in range(2, 12):
        g.compile("regex", f"a{{1,{i}}}").result()
        g.compile("regex", "a{1,1}")  # used again: stays
        assert len(g.cache) <= 4
    assert g.compile("regex", "a{1,1}") is first and ("regex", "a{1,2}") not in g.cache
    out = default_engine.generate("x", {"regex": "b{1,3}", "max_new_tokens": 5, "temperature": 0})
    assert out["text"] in ("b", "bb", "bbb")


# (schema, an instance that breaks it, the words the refusal names)
UNENFORCED = [
    ({"not": {"type": "string"}}, "s", "'not'"),
    ({"if": {"type": "integer"}, "then": {"minimum": 5}}, 1, "'if'"),
    ({"allOf": [{"type": "integer"}, {"minimum": 5}]}, 1, "'allOf' with more than one"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]}, {"a": 1},
     "'required' names 'b'"),
    ({"type": "object", "properties": {"a": {}, "b": {}}, "dependentRequired": {"a": ["b"]}}, {"a": 1},
     "'dependentRequired'"),
    ({"type": "object", "properties": {"a": {}, "b": {}}, "dependentSchemas": {"a": {"required": ["b"]}}},
     {"a": 1}, "'dependentSchemas'"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 1], "'uniqueItems'"),
    ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 3}}, [1], "'contains'"),
    ({"type": "number", "multipleOf": 0.5}, 0.3, "'multipleOf'"),
    ({"type": "number", "multipleOf": 3}, 4, "'multipleOf'"),
    ({"type": "string", "pattern": "^a*$", "maxLength": 2}, "aaa", "'pattern' together with 'maxLength'"),
    ({"type": "string", "format": "date", "pattern": "^2"}, "1999-01-01", "'format' 'date' together"),
    ({"type": "string", "pattern": "^(?!a)[ab]$"}, "a", "lookahead"),
    ({"type": "object", "properties": {"x": {"type": "array", "items": {"not": {"const": 0}}}}},
     {"x": [0]}, "at /properties/x/items"),
    # assertions beside a combinator are dropped (found by a probe)
    ({"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"],
      "allOf": [{"$ref": "#/$defs/N"}], "$defs": {"N": {"type": "object", "properties": {
          "name": {"type": "string"}}, "required": ["name"]}}}, {"name": "x"}, "'properties' beside 'allOf'"),
    ({"$defs": {"X": {"type": "integer"}}, "$ref": "#/$defs/X", "maximum": 5}, 7, "'maximum' beside '$ref'"),
    ({"anyOf": [{"type": "string"}, {"type": "null"}], "maxLength": 3}, "abcdef", "'maxLength' beside 'anyOf'"),
    ({"type": "string", "format": "uri-reference", "minLength": 1}, "", "'format' 'uri-reference' together"),
    ({"type": "string", "format": "email", "maxLength": 8}, "abcdefgh@example.com", "together with 'maxLength'"),
    ({"type": ["number", "null"], "multipleOf": 2}, 3, "'multipleOf'"),
]


@pytest.mark.parametrize("schema,bad,words", UNENFORCED)
def test_schema_features_the_backend_would_not_enforce_are_refused(schema, bad, words):
    """Each refused feature is one xgrammar compiles and then does not enforce: its own
    grammar accepts an instance that jsonschema (the reference validator) says breaks the
    schema.  If an xgrammar upgrade starts enforcing one, this fails: drop it from
    core/schema_check.py."""
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    from portaserve.core.grammar import GrammarError, validate_constraint

    text = json.dumps(schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema, format_checker=jsonschema.FormatChecker())
    g = xgr.Grammar.from_json_schema(text, any_whitespace=False)
    assert _is_grammar_accept_string(g, json.dumps(bad)), "xgrammar enforces this now"
    with pytest.raises(GrammarError, match="cannot be enforced") as ei:
        validate_constraint("json_schema", text)
    assert words in str(ei.value)


@pytest.mark.parametrize("schema,text", [
    ({"anyOf": []}, ""),
    ({"type": "object", "properties": {"a": {"oneOf": []}}, "required": ["a"]}, '{"a": }'),
    ({"type": "object", "properties": {"a": {"type": []}}, "required": ["a"]}, None),
])
def test_a_schema_no_value_matches_is_refused(schema, text):
    """No JSON value matches an empty anyOf / oneOf / type list; xgrammar compiles
    the combinators to a grammar of empty text, so the output was not JSON (found by
    probing, session 17: '{"a": }' with status 200).  The Draft 2020-12 metaschema calls
    such a schema invalid; jsonschema agrees that no value matches."""
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    from portaserve.core.grammar import GrammarError, validate_constraint

    for value in (None, 0, "", [], {}, {"a": 1}, {"a": None}):
        assert not jsonschema.Draft202012Validator(schema).is_valid(value)
    if text is not None:  # what xgrammar lets through
        assert _is_grammar_accept_string(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False),
                                         text), "xgrammar refuses this now"
    with pytest.raises(GrammarError, match="matches no value"):
        validate_constraint("json_schema", json.dumps(schema))


@pytest.mark.parametrize("schema,bad", [
    ({"type": "string", "maxLength": 2}, "aaa"),
    ({"type": "string", "pattern": "^a+$"}, "b"),
    ({"type": "string", "format": "date"}, "1999-13-45x"),
    ({"type": "integer", "multipleOf": 3}, 4),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, [1]),
    ({"allOf": [{"type": "integer"}]}, "s"),
    ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, None),
    ({"$defs": {"x": {"type": "integer"}}, "$ref": "#/$defs/x"}, "s"),
    ({"type": "object", "properties": {"not": {"type": "integer"}, "if": {"type": "integer"}},
      "required": ["not"], "default": {"not": 1}}, {"not": "s"}),  # property names and data, not keywords
    # what pydantic writes: annotations beside $ref / anyOf / oneOf; AnyUrl and HttpUrl;
    # Optional[int] with a multipleOf
    ({"$defs": {"X": {"type": "integer"}}, "$ref": "#/$defs/X", "description": "d", "title": "t"}, "s"),
    ({"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "X"}, 5),
    ({"oneOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/B"}], "discriminator": {"propertyName": "k"},
      "$defs": {"A": {"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]},
                "B": {"type": "object", "properties": {"k": {"const": "b"}}, "required": ["k"]}}}, {"k": "c"}),
    ({"anyOf": [{"type": "string"}, {"type": "integer"}], "enum": ["a", 1]}, "b"),
    ({"$defs": {"X": {"type": "integer"}}, "$ref": "#/$defs/X", "x-order": 1, "propertyOrder": 2}, "s"),
    ({"type": "string", "format": "uri", "minLength": 1}, ""),
    ({"type": "string", "format": "uri", "minLength": 1, "maxLength": 2083}, ""),
    ({"type": ["integer", "null"], "multipleOf": 2}, 3),
])
def test_schema_features_the_backend_enforces_are_accepted(schema, bad):
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    from portaserve.core.grammar import validate_constraint

    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema, format_checker=jsonschema.FormatChecker())
    validate_constraint("json_schema", json.dumps(schema))
    g = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    assert not _is_grammar_accept_string(g, json.dumps(bad))


def test_lookahead_detection():
    from portaserve.core.schema_check import has_lookahead

    assert has_lookahead("a(?=b)") and has_lookahead("(?!x)y") and has_lookahead("[a](?=b)")
    assert not has_lookahead(r"\(?=b") and not has_lookahead("[(?=]b") and not has_lookahead("(?:a)b")
    assert not has_lookahead(r"[\]](?:=)")


def test_constraint_verdicts_are_cached_and_bounded(monkeypatch):
    """validate_constraint keeps each (kind, text)'s verdict: a repeated constraint is not
    parsed again, a bad one is refused again with the same message, and the texts kept stay
    within CHECKED_CHARS (least recently used dropped first)."""
    import uuid

    from portaserve.core import grammar

    calls = []
    real = grammar._validate
    monkeypatch.setattr(grammar, "_validate", lambda kind, text: (calls.append(text), real(kind, text))[1])
    tag = uuid.uuid4().hex[:8]
    good, bad = f"a{tag}[0-9]+", f"a{tag}[0-9"
    for _ in range(2):
        grammar.validate_constraint("regex", good)
    msgs = []
    for _ in range(2):
        with pytest.raises(grammar.GrammarError) as e:
            grammar.validate_constraint("regex", bad)
        msgs.append(str(e.value))
    assert calls == [good, bad] and msgs[0] == msgs[1] and msgs[0].startswith("invalid regex")

    from collections import OrderedDict

    monkeypatch.setattr(grammar, "_checked", OrderedDict())  # other tests' verdicts left out
    monkeypatch.setattr(grammar, "_checked_chars", 0)
    monkeypatch.setattr(grammar, "CHECKED_CHARS", 3 * len(good))
    texts = [f"b{tag}{i}[0-9]" for i in range(5)]  # as long as good
    for t in texts:
        grammar.validate_constraint("regex", t)
    assert grammar._checked_chars <= grammar.CHECKED_CHARS
    assert ("regex", texts[-1]) in grammar._checked and ("regex", texts[0]) not in grammar._checked
    calls.clear()
    grammar.validate_constraint("regex", texts[0])  # dropped: checked again
    assert calls == [texts[0]]


def test_one_check_per_constraint_in_flight(monkeypatch):
    """check_ahead starts a constraint's check on the checking threads and returns its
    future; a second check_ahead and the build (validate_constraint) of the same text,
    while it runs, wait on that check rather than repeating it, and all get its verdict.
    A check dropped at a server's close (cancelled while queued) is done by the build
    itself."""
    import uuid
    from concurrent.futures import Future

    from portaserve.core import grammar

    tag = uuid.uuid4().hex[:8]
    slow, bad = f"s{tag}[a-z]+", f"s{tag}[a-z"
    gate, calls = threading.Event(), []
    real = grammar._validate

    def held(kind, text):
        calls.append(text)
        if text in (slow, bad):
            assert gate.wait(20)
        return real(kind, text)

    monkeypatch.setattr(grammar, "_validate", held)
    first = grammar.check_ahead([("regex", slow), ("regex", bad)])
    again = grammar.check_ahead([("regex", slow), ("regex", bad)])
    assert len(first) == 2 and first == again
    outcome = {}

    def build(text):
        try:
            grammar.validate_constraint("regex", text)
            outcome[text] = None
        except grammar.GrammarError as e:
            outcome[text] = str(e)

    builders = [threading.Thread(target=build, args=(t,)) for t in (slow, bad)]
    for t in builders:
        t.start()
    gate.set()
    for t in builders:
        t.join(20)
    assert calls.count(slow) == 1 and calls.count(bad) == 1
    assert outcome[slow] is None and outcome[bad].startswith("invalid regex")
    assert grammar.check_ahead([("regex", slow)]) == []  # its verdict is kept: nothing to wait for

    # a queued check cancelled (a server closing): the build checks on its own thread
    late = f"l{tag}[0-9]+"
    queued = Future()
    queued.cancel()
    grammar._inflight[("regex", late)] = queued
    grammar.validate_constraint("regex", late)
    assert calls.count(late) == 1 and ("regex", late) in grammar._checked and ("regex", late) not in grammar._inflight
