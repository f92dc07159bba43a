"""Services built on rpcfast: the RAMCloud-style key-value store lives in :mod:`services.kvstore`."""
