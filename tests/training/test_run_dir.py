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
