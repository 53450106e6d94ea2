"""What the runtime says about the machine: the bfloat16 note on CPUs that would be slower."""

import pytest

from mnist_jax import runtime

XEON = {"model": "Intel(R) Xeon(R) Gold 6148", "family": "cpu family 6 model 85", "cores": 2,
        "extensions": ["avx2", "avx512f", "avx512_vnni"]}


@pytest.mark.parametrize("extensions, dtype, says", [
    (["avx2", "avx512f"], "bfloat16", True),  # Skylake-SP: no bfloat16 dot instructions
    (["avx2", "avx512f", "avx512_bf16"], "bfloat16", False),  # Zen 4/5, Cooper Lake
    (["avx2", "avx512f", "amx_bf16"], "bfloat16", False),  # Sapphire Rapids
    (["avx2"], "float32", False),  # float32 needs no note anywhere
])
def test_bfloat16_is_noted_only_where_the_cpu_lacks_its_dot_instructions(
        monkeypatch, extensions, dtype, says):
    monkeypatch.setattr(runtime, "cpu", lambda: {**XEON, "extensions": extensions})
    note = runtime.bfloat16_note(dtype)
    assert (note is not None) == says
    if says:
        assert "Xeon(R) Gold 6148" in note and "likely slower than float32" in note


def test_an_unknown_cpu_gets_no_guess(monkeypatch):
    monkeypatch.setattr(runtime, "cpu", lambda: {**XEON, "family": "", "extensions": []})
    assert runtime.bfloat16_note("bfloat16") is None
