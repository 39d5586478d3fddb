"""--sampling-defaults model (the default, as in SGLang and vLLM): a request's missing sampling
parameters come from the model's generation_config.json.  Checked against transformers'
greedy decoding with and without the file's repetition penalty."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import hf_greedy, random_prompts
from portaserve import Engine
from portaserve.core.request_builder import Limits, build_req
from portaserve.core.sampling_params import InvalidRequest

N = 16


@pytest.fixture(scope="module")
def model_with_defaults(tiny_models, tmp_path_factory):
    """The tiny llama3 checkpoint with a generation_config.json asking for greedy decoding
    with a repetition penalty."""
    path = tmp_path_factory.mktemp("gen-defaults") / "llama3"
    shutil.copytree(tiny_models("llama3"), path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(temperature=0.0, repetition_penalty=1.3, do_sample=True)
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path


def test_model_defaults_apply_where_the_request_is_silent(model_with_defaults):
    hf = AutoModelForCausalLM.from_pretrained(str(model_with_defaults), torch_dtype=torch.float32).eval()
    prompts = random_prompts(3, 512, 10, 40, seed=3)
    penalised = [hf_greedy(hf, ids, N, repetition_penalty=1.3)[0] for ids in prompts]
    plain = [hf_greedy(hf, ids, N)[0] for ids in prompts]
    assert penalised != plain  # the penalty changes these outputs: the test can tell them apart

    common = {"max_new_tokens": N, "ignore_eos": True}
    with Engine(str(model_with_defaults), skip_tokenizer_init=True, max_total_tokens=2000) as eng:
        assert eng.get_server_info()["sampling_defaults"] == {"temperature": 0.0, "repetition_penalty": 1.3}
        silent = eng.generate(input_ids=prompts, sampling_params=dict(common))
        nulls = eng.generate(input_ids=prompts, sampling_params={**common, "repetition_penalty": None})
        own = eng.generate(input_ids=prompts, sampling_params={**common, "repetition_penalty": 1.0})
    assert [o["output_ids"] for o in silent] == penalised
    assert [o["output_ids"] for o in nulls] == penalised  # null is left out
    assert [o["output_ids"] for o in own] == plain  # the request's own value wins

    with Engine(str(model_with_defaults), skip_tokenizer_init=True, max_total_tokens=2000,
                sampling_defaults="openai") as eng:
        assert eng.get_server_info()["sampling_defaults"] == {}
        out = eng.generate(input_ids=prompts, sampling_params={**common, "temperature": 0})
    assert [o["output_ids"] for o in out] == plain


def test_bad_generation_config_fails_the_start(tiny_models, tmp_path):
    path = tmp_path / "llama3"
    shutil.copytree(tiny_models("llama3"), path)
    for bad, words in (({"temperature": "hot"}, "temperature is 'hot', not a number"),
                       ({"top_p": 1.5}, "top_p")):
        (path / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="generation_config.json") as e:
            Engine(str(path), skip_tokenizer_init=True, max_total_tokens=2000)
        assert words in str(e.value)
    # ... which --sampling-defaults openai does not read
    with Engine(str(path), skip_tokenizer_init=True, max_total_tokens=2000, sampling_defaults="openai") as eng:
        assert eng.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2})["output_ids"]


def test_defaults_reach_build_req_only_for_missing_fields():
    lim = Limits(1000, 50, 2000, sampling_defaults={"temperature": 0.6, "top_k": 20})
    p = build_req(lim, None, None, [1, 2], {"top_k": 5}).sampling
    assert (p.temperature, p.top_k) == (0.6, 5)
    p = build_req(lim, None, None, [1, 2], None).sampling
    assert (p.temperature, p.top_k) == (0.6, 20)
    with pytest.raises(InvalidRequest, match="top_k"):  # the request's own values are still checked
        build_req(lim, None, None, [1, 2], {"top_k": "x"})


def test_generation_config_top_k_zero_means_no_top_k(tiny_models, tmp_path):
    """transformers writes top_k 0 for "no top-k"; here that is -1 (0 is refused in requests)."""
    from portaserve.models.loader import ModelSource
    from portaserve.runtime import _sampling_defaults
    from portaserve.server_args import ServerArgs

    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": 0, "temperature": 0.6}))
    src = ModelSource("hf", tmp_path, "m")
    assert _sampling_defaults(ServerArgs(), src) == {"top_k": -1, "temperature": 0.6}
    assert _sampling_defaults(ServerArgs(sampling_defaults="openai"), src) == {}
