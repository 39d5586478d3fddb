"""Runs inside a virtualenv with the unmodified sglang==0.5.2 frontend; prints JSON.

usage: python frontend_program.py URL
"""
import json
import sys

import sglang as sgl

url = sys.argv[1]
backend = sgl.RuntimeEndpoint(url)
sgl.set_default_backend(backend)
out = {"model_path": backend.get_model_name()}


@sgl.function
def qa(s, country):
    s += "The capital of " + country + " is"
    s += sgl.gen("answer", max_tokens=12, temperature=0)


@sgl.function
def pick(s):
    s += "The color of the sky on a clear day is"
    s += sgl.select("color", choices=[" blue", " green", " purple"])


@sgl.function
def colors(s):
    s += "Here are two facts about the ocean.\n"
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Fact {i + 1}:" + sgl.gen("fact", max_tokens=8, temperature=0, stop="\n")
    forks.join()
    s += "Summary: " + forks[0]["fact"] + " /" + forks[1]["fact"]


@sgl.function
def number(s):
    s += "The year the first man walked on the moon was "
    s += sgl.gen("year", max_tokens=6, regex=r"[0-9]{4}", temperature=0)


st = qa.run(country="France")
out["gen"] = st["answer"]
out["gen_meta"] = st.get_meta_info("answer")
out["gen_text"] = st.text()

st = qa.run(country="France", stream=True)
out["stream"] = "".join(st.text_iter("answer"))

st = pick.run()
out["select"] = st["color"]
out["select_meta"] = st.get_meta_info("color")

st = colors.run()
out["fork_text"] = st.text()

states = qa.run_batch([{"country": "Italy"}, {"country": "Spain"}])
out["batch"] = [s["answer"] for s in states]

try:
    st = number.run()
    out["regex"] = st["year"]
except Exception as e:  # structured output may be unavailable in this build
    out["regex_error"] = str(e)

backend.flush_cache()
out["server_info_keys"] = sorted(backend.get_server_info())
print("RESULT " + json.dumps(out))
