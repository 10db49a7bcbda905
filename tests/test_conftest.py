"""The test setup itself: a failing test names the seed of its random inputs."""

from types import SimpleNamespace

from .conftest import add_seed_section


def test_this_test_got_a_seed_and_it_is_the_torch_seed(request):
    import torch

    assert isinstance(request.node.fastjepa_seed, int)
    assert torch.initial_seed() == request.node.fastjepa_seed


def test_failed_report_names_the_seed_passed_one_does_not():
    item = SimpleNamespace(fastjepa_seed=1234)
    failed, passed = SimpleNamespace(failed=True, sections=[]), SimpleNamespace(failed=False, sections=[])
    add_seed_section(item, failed)
    add_seed_section(item, passed)
    assert failed.sections == [("random seed", "this test's inputs came from torch.manual_seed(1234)")]
    assert passed.sections == []


def test_triton_tests_skip_naming_why_the_interpreter_cannot_run():
    from fastjepa.ops._dispatch import Availability

    from .conftest import triton_skip_reason

    assert triton_skip_reason(Availability(True, "triton 3.9.0")) is None
    why = "Triton 3.6.0's interpreter (TRITON_INTERPRET=1) cannot run on NumPy 2.4.6: install triton>=3.7 or numpy<2.4"
    assert triton_skip_reason(Availability(False, why)) == f"Triton kernels cannot run here: {why}"
