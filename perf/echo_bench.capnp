@0xb69f9f63698b1b3f;
# Echo interface for the pycapnp peer in `rpcfast-perf rpc`: the smallest useful RPC, so the
# measurement is the cost of the RPC system and not of the schema.

interface Echo {
  echo @0 (data :Data) -> (data :Data);
}
