@0xd3c9a1e5b7f20481;
# The echo service: the null RPC and payload echoes used by tests, `make run` and perf/.

interface Echo {
  ping @0 () -> ();
  echo @1 (data :Data) -> (data :Data);
  # Returns `size` bytes (a large response from a small request).
  fill @2 (size :UInt32) -> (data :Data);
  # Sleeps `seconds` before answering: for cancellation and timeout tests.
  sleep @3 (seconds :Float64) -> ();
  # Raises a ServiceError with `code`.
  fail @4 (code :UInt32, message :Text) -> ();
}
