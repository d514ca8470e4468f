"""The Gran data layer: the shard schema, the synthetic Gran set, converters and streaming task builders."""
