@0xa7d41c2b9e3f5061;
# The kvstore master service: object operations on the tablets a master owns, plus the table
# directory a standalone master keeps until a coordinator exists.

struct RejectRules {
  givenVersion @0 :UInt64;
  doesntExist @1 :Bool;
  exists @2 :Bool;
  versionLeGiven @3 :Bool;
  versionNeGiven @4 :Bool;
}

# One item of a multi-operation, and its outcome. status = 0 is OK, else a kvstore Status code.
struct Item {
  tableId @0 :UInt64;
  key @1 :Data;
  value @2 :Data;
  delta @3 :Int64;
  hasRules @4 :Bool;
  rejectRules @5 :RejectRules;
}

struct Outcome {
  status @0 :UInt32;
  message @1 :Text;
  version @2 :UInt64;
  value @3 :Data;
  counter @4 :Int64;
}

struct Object {
  key @0 :Data;
  value @1 :Data;
  version @2 :UInt64;
}

interface Master {
  read @0 (tableId :UInt64, key :Data, hasRules :Bool, rejectRules :RejectRules)
      -> (value :Data, version :UInt64);
  write @1 (tableId :UInt64, key :Data, value :Data, hasRules :Bool, rejectRules :RejectRules)
      -> (version :UInt64);
  remove @2 (tableId :UInt64, key :Data, hasRules :Bool, rejectRules :RejectRules)
      -> (version :UInt64);
  increment @3 (tableId :UInt64, key :Data, delta :Int64, hasRules :Bool, rejectRules :RejectRules)
      -> (value :Int64, version :UInt64);
  multiRead @4 (items :List(Item)) -> (outcomes :List(Outcome));
  multiWrite @5 (items :List(Item)) -> (outcomes :List(Outcome));
  multiRemove @6 (items :List(Item)) -> (outcomes :List(Outcome));
  multiIncrement @7 (items :List(Item)) -> (outcomes :List(Outcome));
  # Objects of a table in key-hash order, resumable: pass back `cursor` until `done`.
  enumerate @8 (tableId :UInt64, startHash :UInt64, endHash :UInt64, cursor :Data,
                maxBytes :UInt32)
      -> (objects :List(Object), cursor :Data, done :Bool);
  createTable @9 (name :Text, serverSpan :UInt32) -> (tableId :UInt64);
  getTableId @10 (name :Text) -> (tableId :UInt64);
  dropTable @11 (name :Text) -> ();
  # Memory, cleaner and operation counters as JSON text (for `status` views).
  stats @12 () -> (json :Text);
}
