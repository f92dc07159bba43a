@0xc51e2a7b3d904f18;
# Cluster membership, tables and replication: the coordinator, the backup service, and the
# administrative calls a coordinator makes on storage servers.

# A server id is (generation << 32) | index: an index is reused after a server leaves,
# with a higher generation, so a stale id never names the new server.
struct ServerEntry {
  serverId @0 :UInt64;
  address @1 :Text;          # e.g. "udp://127.0.0.1:4101"
  services @2 :UInt32;       # bit 0: master, bit 1: backup
  status @3 :UInt8;          # 0 up, 1 crashed (being recovered), 2 removed
}

struct Tablet {
  tableId @0 :UInt64;
  startHash @1 :UInt64;      # inclusive
  endHash @2 :UInt64;        # inclusive
  serverId @3 :UInt64;
  address @4 :Text;
  status @5 :UInt8;          # 0 normal, 1 recovering
}

struct TableInfo {
  tableId @0 :UInt64;
  name @1 :Text;
  serverSpan @2 :UInt32;
}

interface Coordinator {
  enlistServer @0 (address :Text, services :UInt32, replacesId :UInt64) -> (serverId :UInt64);
  getServerList @1 () -> (version :UInt64, servers :List(ServerEntry));
  createTable @2 (name :Text, serverSpan :UInt32) -> (tableId :UInt64);
  getTableId @3 (name :Text) -> (tableId :UInt64);
  dropTable @4 (name :Text) -> ();
  # tableId 0: the whole map.
  getTabletMap @5 (tableId :UInt64) -> (tablets :List(Tablet));
  listTables @6 () -> (tables :List(TableInfo));
  # Any server that suspects a peer is dead says so; the coordinator verifies before acting.
  hintServerCrashed @7 (serverId :UInt64) -> ();
  # A server that leaves cleanly.
  removeServer @8 (serverId :UInt64) -> ();
}

# Calls the coordinator (and peers) make on a storage server.
interface ServerAdmin {
  ping @0 (callerId :UInt64) -> (serverId :UInt64, serverListVersion :UInt64);
  updateServerList @1 (version :UInt64, servers :List(ServerEntry)) -> ();
  takeTabletOwnership @2 (tableId :UInt64, startHash :UInt64, endHash :UInt64) -> ();
  dropTabletOwnership @3 (tableId :UInt64, startHash :UInt64, endHash :UInt64) -> ();
  # JSON text: memory, disk, cleaner, replication and operation counters.
  getStatistics @4 () -> (json :Text);
}

struct ReplicaInfo {
  segmentId @0 :UInt64;
  length @1 :UInt32;
  closed @2 :Bool;
  primary @3 :Bool;
}

interface Backup {
  # Write bytes [offset, offset+len(data)) of a replica. `open` creates it (offset 0);
  # `close` marks it complete (the backup then writes it to its file). Acknowledged once the bytes
  # are in the backup's memory buffer (or, in fsync mode, on disk).
  writeSegment @0 (masterId :UInt64, segmentId :UInt64, offset :UInt32, data :Data,
                   open :Bool, close :Bool, primary :Bool) -> ();
  freeSegment @1 (masterId :UInt64, segmentId :UInt64) -> ();
  # For recovery: which replicas of a master this backup holds, and their bytes.
  listReplicas @2 (masterId :UInt64) -> (replicas :List(ReplicaInfo));
  getReplica @3 (masterId :UInt64, segmentId :UInt64) -> (data :Data, closed :Bool);
}
