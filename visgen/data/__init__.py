"""Data layer: writing and streaming WebDataset shards (the DataModule is in visgen.data.datamodule)."""

# The DataModule is deliberately not imported here: evaluation code imports visgen.data without Lightning.
from visgen.data.shards import write_shards
from visgen.data.stream import ShardStream, center_crop_arr, expand_shard_spec, load_all

__all__ = ["ShardStream", "center_crop_arr", "expand_shard_spec", "load_all", "write_shards"]
