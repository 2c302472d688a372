"""The data layer: raw formats to validated splits (``rawdata``, ``readers``, ``synthetic``,
``text``, ``prepare``), the split and SID files' readers (``splits``, ``sids``), and the
WebDataset shards: their sample format, the shard stage and the training readers
(``shardformat``, ``shard``, ``loaders``)."""
