"""The shared-memory sync's bucket writer leaves the actor's weights movable (the lifecycle offloads them)."""

import torch

from vppo_megatron.rollout.staging import write_shared_bucket


def test_writing_a_bucket_keeps_the_weights_storage_resizable(tmp_path):
    # with the distributed optimizer every weight is a view of one flat buffer, and a replicated weight reaches
    # the writer as that view: exporting it to numpy would fix the buffer for good, and actor.offload=all fails
    flat = torch.arange(12, dtype=torch.float32)
    bucket = write_shared_bucket(tmp_path / "b0", [("norm.weight", flat[4:8]), ("whole", flat)])
    assert flat.untyped_storage().resizable()
    raw = (tmp_path / "b0").read_bytes()
    assert raw == flat[4:8].numpy().tobytes() + torch.arange(12, dtype=torch.float32).numpy().tobytes()
    assert [entry[:3] for entry in bucket.manifest] == [("norm.weight", "float32", [4]), ("whole", "float32", [12])]


def test_staging_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    """A killed run leaves its last synced version in shared memory (the whole model, in RAM until reboot); the
    next WeightSync on the host removes the files whose writer process is gone, never a live writer's."""
    import os
    import subprocess

    from vppo_megatron.rollout.staging import remove_stale_staging

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"vppo-sync-0a1b2c3d-p{dead.pid}-v3-pp0-0000"
    live = tmp_path / f"vppo-sync-0a1b2c3d-p{os.getpid()}-v3-pp0-0000"
    other = tmp_path / "vppo-sync-notours"  # not a staging name of ours: left alone
    node = tmp_path / "vppo-sync-0a1b2c3d-node1"  # a node's staging directory: its dead writer's files go, then it
    node.mkdir()
    in_node = node / f"p{dead.pid}-s0-pp0-b0000"
    busy = tmp_path / "vppo-sync-0a1b2c3d-node0"  # a directory with a live writer's file stays
    busy.mkdir()
    busy_files = [busy / f"p{dead.pid}-s1-pp1-b0003", busy / f"p{os.getpid()}-s1-pp0-b0000"]
    for path in (stale, live, other, in_node, *busy_files):
        path.write_bytes(b"x" * 100)
    assert remove_stale_staging(tmp_path) == (3, 300)
    assert not stale.exists() and live.exists() and other.exists()
    assert not node.exists() and [p.name for p in busy.iterdir()] == [busy_files[1].name]
