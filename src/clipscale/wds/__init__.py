"""The WebDataset shard format, with no torch: reading tar members and grouping them into samples
(`tar`), what a sample holds (`schema`: image keys, caption rules, labels, skip reasons), shard
lists and their sample counts (`shardlist`, `urls`), and shard indexes (`manifest`).

Training (`clipscale.data`), the shard tools (`clipscale.shards`) and evaluation all read shards
through this package and nothing else.
"""
