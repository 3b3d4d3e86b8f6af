"""The run directory's checkpoint lookup (what `ckpt_path=last` resumes from)."""


def test_newest_checkpoint_orders_by_step_and_reads_old_names(tmp_path):
    from visgen.training.run import newest_checkpoint

    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    assert newest_checkpoint(tmp_path) is None
    for name in ["step_0000900.ckpt", "step=0001000.ckpt", "step_0000140.ckpt", "other.ckpt"]:
        (ckpt_dir / name).write_bytes(b"")
    assert newest_checkpoint(tmp_path).name == "step=0001000.ckpt"  # runs from before the rename still resume
    (ckpt_dir / "step_0001120.ckpt").write_bytes(b"")
    assert newest_checkpoint(tmp_path).name == "step_0001120.ckpt"


def test_newest_checkpoint_takes_a_newer_preemption_checkpoint_and_prefers_the_regular_one_on_a_tie(tmp_path):
    from visgen.training.run import newest_checkpoint

    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    (ckpt_dir / "last.ckpt").write_bytes(b"")
    assert newest_checkpoint(tmp_path).name == "last.ckpt"  # only when nothing names its step
    for name in ["step_0000200.ckpt", "preempted_step_0000250.ckpt"]:
        (ckpt_dir / name).write_bytes(b"")
    assert newest_checkpoint(tmp_path).name == "preempted_step_0000250.ckpt"  # not last.ckpt -> step 200
    (ckpt_dir / "step_0000250.ckpt").write_bytes(b"")
    assert newest_checkpoint(tmp_path).name == "step_0000250.ckpt"
