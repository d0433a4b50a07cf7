"""VPPO_FAULT's grammar (the reliability tests inject every fault through it)."""

import pytest

from vppo_megatron import faults
from vppo_megatron.faults import Fault


@pytest.mark.parametrize(
    "text, expected",
    [
        ("kill@update", Fault("kill", "update", None, 0)),
        ("kill@checkpoint_write:1", Fault("kill", "checkpoint_write", 1, 0)),
        ("kill@rollout:2:1", Fault("kill", "rollout", 2, 1)),
        ("disk_full@checkpoint:*:all", Fault("disk_full", "checkpoint", None, None)),
        ("stop_engine@sync_load", Fault("stop_engine", "sync_load", None, 0)),
    ],
)
def test_every_form_parses(text, expected):
    assert Fault.parse(text) == expected


@pytest.mark.parametrize("text", ["explode@update", "kill@nowhere", "kill", "kill@update:1:0:9", "kill@update:x"])
def test_a_bad_spec_names_the_grammar(text):
    with pytest.raises(ValueError, match="expected action@point"):
        Fault.parse(text)


def test_a_fault_fires_once_at_its_step_and_rank_only(monkeypatch):
    monkeypatch.setenv(faults.ENV, "disk_full@update:3, disk_full@sync:*:1")
    monkeypatch.setattr(faults, "_fired", set())
    faults.set_step(2)
    assert faults._due("update") == [] and faults._due("sync") == []  # step 2; rank 0 is not rank 1
    faults.set_step(3)
    assert faults._due("update") == [Fault("disk_full", "update", 3, 0)]
    assert faults._due("update") == []  # once per process
