import pytest
import torch

from matta.ops import DeferredReport


def test_nothing_filed_reads_nothing():
    report = DeferredReport()
    assert not report
    assert not bool(report.any_failed())
    report.check()  # no error


def test_failed_checks_are_named_once_in_filing_order_and_cleared():
    report = DeferredReport()
    report.add(torch.tensor(False), "a is fine")
    report.add(torch.tensor(True), "b failed")
    report.add(torch.tensor([True]), "c failed")
    report.add(torch.tensor(True), "b failed")
    assert bool(report.any_failed())
    with pytest.raises(ValueError, match=r"^loss: b failed; c failed$"):
        report.check(prefix="loss: ")
    assert not report
    report.check()  # read and cleared


def test_flags_of_one_message_are_or_ed_not_kept_one_per_call():
    report = DeferredReport()
    for i in range(1000):
        report.add(torch.tensor(i == 3), "bad step")
        report.add(torch.tensor([False, i == 5]), ("never", "bad later"))
    assert len(report._flags) == 2
    assert report.take() == ["bad step", "bad later"]


def test_clear_drops_unread_checks():
    report = DeferredReport()
    report.add(torch.tensor(True), "x")
    report.clear()
    report.check()


def test_a_later_passing_check_does_not_hide_an_earlier_failure():
    report = DeferredReport()
    report.add(torch.tensor(True), "x")
    report.add(torch.tensor(False), "x")
    with pytest.raises(FloatingPointError, match="x"):
        report.check(FloatingPointError)


def test_flags_stay_on_their_device_until_read():
    report = DeferredReport()
    report.add(torch.tensor(True, device="meta"), "on meta")  # never read in a step: meta cannot be read
    assert report.any_failed().device.type == "meta"


@pytest.mark.parametrize("bad", [True, torch.ones(2, dtype=torch.bool), 1.0])
def test_one_flag_per_message(bad):
    with pytest.raises(TypeError, match="one flag per message"):
        DeferredReport().add(bad, "m")
