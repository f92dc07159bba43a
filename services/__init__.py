"""Services built on rpcfast (the key-value store is :mod:`services.kvstore`)."""
