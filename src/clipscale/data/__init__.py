"""The training stream: which stream reads what (plan), re-layout on another world size, the
deterministic in-block shuffle, decoding and transforms, and the DataLoader (loader.TrainData).

Import the submodules you need; this package imports nothing eagerly, so tools that only read
shards never load torch.
"""
