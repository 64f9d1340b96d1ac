// Sink: the standby role. Receives epochs from sources, verifies every
// frame, spools them durably, acknowledges, applies them to the standby
// images, snapshots each as a restore point and records it in the catalog.
//
// Per epoch, in order:
//   1. frames arrive; each is verified (EpochVerifier) before it is
//      appended to spool_dir/<volume>/<seq>.spool;
//   2. at EpochEnd: Sync (fdatasync) -> EpochAck DURABLE;
//   3. replay the spool onto the standby image, verifying again;
//   4. snapshot cairn.<seq> on the standby image: the restore point;
//   5. catalog record (RADOS omap) -> spool removed -> EpochAck APPLIED.
// A crash anywhere leaves either the old newest point or the new one; a
// durable spool not yet applied is applied when the source reconnects.
// A frame that fails verification is never spooled: the sink answers with
// a LinkError and closes, and the source re-sends the epoch.
//
// Thread-safety: Serve may run on many threads at once (one per source
// connection). A new connection for a volume that has one already replaces
// it (the source reconnected after a cut the old session has not noticed
// yet). Report,
// Points and Restore are safe from any thread.
#pragma once

#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <condition_variable>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "engine/catalog.h"
#include "engine/epoch.h"
#include "engine/kv_store.h"
#include "engine/link.h"
#include "engine/tcp_link.h"
#include "engine/replication.h"
#include "engine/spool.h"
#include "engine/volume.h"

namespace cairn {

struct SinkEnv {
  std::string site;
  std::filesystem::path spool_dir;
  std::vector<std::string> pools;  // pools this sink serves
  std::function<StatusOr<std::shared_ptr<Pool>>(const std::string& pool)> open_pool;
  std::function<StatusOr<std::shared_ptr<KvStore>>(const std::string& pool)> open_catalog;
  EpochOptions apply;
  SpoolOptions spool;
  LinkTimeouts timeouts;
};

struct RestoreResult {
  std::string pool;
  std::string image;
  RestorePoint point;
  std::string mode;  // "clone" or "full"
};

class Sink {
 public:
  explicit Sink(SinkEnv env);

  // Serves one source connection until it closes or fails. Returns OK when
  // the source hung up cleanly.
  Status Serve(Link& link);

  std::vector<VolumeStatusInfo> Report() const;
  StatusOr<std::vector<RestorePoint>> Points(const std::string& volume);
  // seq 0: the newest point. kAlreadyExists if `to_image` exists.
  StatusOr<RestoreResult> Restore(const std::string& volume, uint64_t seq,
                                  const std::string& to_image, bool full,
                                  const ProgressFn& progress);
  // Frames refused for failing verification, since start.
  uint64_t corrupt_frames() const;

 private:
  struct Target;  // one volume being received
  Status Session(Link& link, Target& t);
  StatusOr<EpochSummary> ReceiveEpoch(Link& link, Target& t, Frame begin);
  Status ApplyAndCommit(Target& t, uint64_t seq, int64_t snap_time_ns_hint);
  Status RecoverSpool(Target& t);
  // Reads the verified prefix of t.partial's spool into `verifier`.
  Status ReplayPrefix(Target& t, const std::filesystem::path& path, EpochVerifier& verifier);
  StatusOr<std::string> FindVolumePool(const std::string& volume);
  void SetState(const std::string& volume, const std::function<void(VolumeStatusInfo&)>& fn);

  SinkEnv env_;
  mutable std::mutex mu_;
  std::condition_variable released_;
  std::map<std::string, Link*> active_;  // volumes with a live session
  std::map<std::string, std::string> active_images_;  // volume -> its pool/image
  std::map<std::string, VolumeStatusInfo> status_;
  uint64_t corrupt_frames_ = 0;
};

}  // namespace cairn
