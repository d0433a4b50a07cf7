"""The shared-memory sync's bucket writer leaves the actor's weights movable (the lifecycle offloads them)."""

import torch

from vppo_megatron.sync.weight_sync import write_shared_bucket


def test_writing_a_bucket_keeps_the_weights_storage_resizable(tmp_path):
    # with the distributed optimizer every weight is a view of one flat buffer, and a replicated weight reaches
    # the writer as that view: exporting it to numpy would fix the buffer for good, and actor.offload=all fails
    flat = torch.arange(12, dtype=torch.float32)
    bucket = write_shared_bucket(tmp_path / "b0", [("norm.weight", flat[4:8]), ("whole", flat)])
    assert flat.untyped_storage().resizable()
    raw = (tmp_path / "b0").read_bytes()
    assert raw == flat[4:8].numpy().tobytes() + torch.arange(12, dtype=torch.float32).numpy().tobytes()
    assert [entry[:3] for entry in bucket.manifest] == [("norm.weight", "float32", [4]), ("whole", "float32", [12])]
