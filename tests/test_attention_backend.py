"""--attention-backend (SGLang's flag) picks the attention ops' provider as a group, the
planning hook and cascade kernel following where the provider has them; --kernel wins."""
from __future__ import annotations

import pytest

from portaserve.platforms import resolve_op_table, resolve_platform
from portaserve.server_args import ServerArgs


def test_attention_backend_sets_the_attention_ops():
    args = ServerArgs(model_path="m", attention_backend="native")
    table = resolve_op_table(resolve_platform("cpu"), args.kernel_overrides()).as_dict()
    for op in ("attention_extend", "attention_decode", "attention_decode_shared"):
        assert table[op]["provider"] == "native" and table[op]["forced"], (op, table[op])
    assert table["attention_prepare"]["provider"] == "native"
    default = resolve_op_table(resolve_platform("cpu"), ServerArgs(model_path="m").kernel_overrides()).as_dict()
    assert default["attention_decode"]["provider"] == "sdpa" and not default["attention_decode"]["forced"]


def test_kernel_entries_win_and_the_hook_falls_back_to_native():
    args = ServerArgs(model_path="m", attention_backend="sdpa", kernel=["attention_decode=native"])
    table = resolve_op_table(resolve_platform("cpu"), args.kernel_overrides()).as_dict()
    assert table["attention_extend"]["provider"] == "sdpa"
    assert table["attention_decode"]["provider"] == "native"
    assert table["attention_prepare"]["provider"] == "native"  # sdpa plans nothing


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="--attention-backend 'fa9'.*flashinfer.*triton"):
        ServerArgs(model_path="m", attention_backend="fa9").validate()


def test_backend_that_cannot_run_here_names_the_reason():
    from portaserve.core.ops import OpResolutionError

    args = ServerArgs(model_path="m", attention_backend="flashinfer")
    with pytest.raises(OpResolutionError, match="flashinfer cannot run here: not for platform cpu"):
        resolve_op_table(resolve_platform("cpu"), args.kernel_overrides())


def test_planning_hook_follows_the_attention_ops(monkeypatch):
    """attention_prepare runs the provider the attention ops run (a host-planning provider
    always gets its plans), also under --kernel all=...; naming it against them is an error."""
    from portaserve.core.ops import OpResolutionError, registry

    monkeypatch.setitem(registry.PROVIDERS, ("attention_prepare", "sdpa"),
                        registry.Provider("attention_prepare", "sdpa", ("cpu",), "portaserve.core.ops.native:attention_prepare"))
    cpu = resolve_platform("cpu")
    assert resolve_op_table(cpu).as_dict()["attention_prepare"]["provider"] == "sdpa"
    t = resolve_op_table(cpu, ["all=native", "attention_extend=sdpa"]).as_dict()
    assert t["attention_prepare"]["provider"] == "sdpa" and t["attention_decode"]["provider"] == "native"
    assert resolve_op_table(cpu, ["all=native"]).as_dict()["attention_prepare"]["provider"] == "native"
    with pytest.raises(OpResolutionError, match="attention_prepare=native does not fit.*must be sdpa"):
        resolve_op_table(cpu, ["attention_prepare=native"])


def test_bad_kernel_entry_fails_in_validate():
    with pytest.raises(ValueError, match="unknown op 'attention_sideways'"):
        ServerArgs(model_path="m", kernel=["attention_sideways=triton"]).validate()


def test_engine_start_names_the_backend_that_cannot_run(tiny_models):
    from portaserve import Engine
    from portaserve.core.ops import OpResolutionError

    with pytest.raises(OpResolutionError, match="--attention-backend flashinfer: .*not for platform cpu"):
        Engine(str(tiny_models("llama3")), skip_tokenizer_init=True, device="cpu", attention_backend="flashinfer")


def test_hook_provider_is_not_checked_when_the_ops_do_not_use_it(monkeypatch):
    """--attention-backend triton must not build or run FlashInfer at start-up just to
    resolve the planning hook: the hook is not walked by priority, only loaded."""
    from portaserve.core.ops import registry

    checked = []

    def fits(model):
        checked.append(model)
        return None

    monkeypatch.setitem(registry.PROVIDERS, ("attention_prepare", "picky"),
                        registry.Provider("attention_prepare", "picky", ("cpu",),
                                          "portaserve.core.ops.native:attention_prepare", supports=fits))
    model = {"dtype": "bf16", "kv_dtype": "bf16", "head_dim": 64}
    t = resolve_op_table(resolve_platform("cpu"), ["attention_extend=native"], model).as_dict()
    assert t["attention_prepare"]["provider"] == "native" and checked == []
