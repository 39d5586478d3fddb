"""TP=2 vs TP=1 greedy agreement on the same random weights (Llama-3.1-8B shape, bf16).

Random weights come from --load-format dummy, which generates every checkpoint tensor
whole from (seed, name) and then slices it, so both runs serve the same model.  Row-
parallel layers sum bf16 partial products across ranks, a different rounding order from
one GPU's matmul, so where the single-GPU top-2 logits are nearly tied the argmax may
flip; for every prompt that differs the first diverging position and the TP=1 top-2
log-probability gap there are printed."""
import json
import sys

import torch

from portaserve import Engine

N_PROMPTS, N_TOKENS = 8, 32


def main(path, dtype="bfloat16", vocab_hi=128000):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, vocab_hi, (int(torch.randint(16, 200, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(N_PROMPTS)]
    sp = {"max_new_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True}
    res = {}
    for tp in (1, 2):
        with Engine(path, load_format="dummy", dtype=dtype, skip_tokenizer_init=True,
                    context_length=1024, tp_size=tp, max_running_requests=16,
                    max_total_tokens=20000) as eng:
            print(f"TP={tp}: loaded, decode graphs {eng.rt.info()['decode_graphs']}", flush=True)
            res[tp] = eng.generate(input_ids=prompts, sampling_params=sp, return_logprob=True,
                                   top_logprobs_num=2)
            print(f"TP={tp}: generated", flush=True)
    same = 0
    for i, (a, b) in enumerate(zip(res[1], res[2])):
        if a["output_ids"] == b["output_ids"]:
            same += 1
            continue
        k = next(j for j, (x, y) in enumerate(zip(a["output_ids"], b["output_ids"])) if x != y)
        top = a["meta_info"]["output_top_logprobs"][k]
        gap = top[0][0] - top[1][0]
        print(f"prompt {i}: first difference at token {k}; TP=1 top-2 logprob gap there {gap:.4f}")
    print(f"TP=2 greedy identical to TP=1 on {same}/{N_PROMPTS} prompts x {N_TOKENS} tokens")


if __name__ == "__main__":  # the other ranks are spawned: they re-import this file
    main(sys.argv[1], *sys.argv[2:3], *[int(v) for v in sys.argv[3:4]])
