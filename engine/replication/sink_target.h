// The sink's private parts shared by its files (sink.cc: sessions and
// receiving; sink_apply.cc: points; sink_recovery.cc: spool recovery and
// retries; sink_standby.cc: restore, promote, release). Not for use outside
// engine/replication/.
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <filesystem>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "engine/replication/sink.h"

namespace cairn {

// Holds (volume, seq) in `held` for its lifetime, under `mu`: retention
// keeps a held point (Sink::verifying_: verifies and restores).
class PointHold {
 public:
  PointHold(std::mutex& mu, std::multiset<std::pair<std::string, uint64_t>>& held,
            std::string volume, uint64_t seq)
      : mu_(mu), held_(held), key_(std::move(volume), seq) {
    std::lock_guard lock(mu_);
    it_ = held_.insert(key_);
  }
  ~PointHold() {
    std::lock_guard lock(mu_);
    held_.erase(it_);
  }
  PointHold(const PointHold&) = delete;
  PointHold& operator=(const PointHold&) = delete;

 private:
  std::mutex& mu_;
  std::multiset<std::pair<std::string, uint64_t>>& held_;
  std::pair<std::string, uint64_t> key_;
  std::multiset<std::pair<std::string, uint64_t>>::iterator it_;
};

// "20261206T114500Z": the UTC time of `unix_ns`, for the names of images
// and snapshots kept aside (failback, divergence).
std::string UtcStamp(int64_t unix_ns);

// The snapshot a standby image with no restore point yet was adopted
// from (Sink::AdoptWithoutPoint): its newest cairn-divergent-<time>. The
// first epoch is compared with it by digests; none if there is none.
std::optional<SnapInfo> ResyncBaseOf(const std::vector<SnapInfo>& snaps);

// Writing the epoch to the standby head as it arrives stopped: the epoch is
// still spooled, and ApplyAndCommit replays it from there.
void WarnAppliedFromSpool(const std::string& volume, uint64_t seq, const Status& why);

struct Sink::Target {
  std::string volume;
  std::string pool_name;
  std::string image;
  std::string source_site;
  std::shared_ptr<Pool> pool;
  std::shared_ptr<KvStore> kv;
  std::unique_ptr<Catalog> catalog;
  uint64_t last_seq = 0;
  ChainDigest chain;
  // A durable, verified prefix of epoch last_seq + 1 (after a cut).
  struct Partial {
    uint64_t seq = 0;
    uint64_t records = 0;
    uint64_t offset = 0;  // end of its last whole frame, in spool bytes
  } partial;
  bool resumed = false;  // the epoch being received continues a partial one
  // Where the epoch's receive went, in seconds (the restore point's log
  // line says it): which stage of the pipeline the epoch waited on.
  struct ReceiveTimes {
    double total = 0;    // EpochBegin to synced spool
    double link = 0;     // waiting for frames from the source
    double verify = 0;   // parsing and hashing frames
    double spool = 0;    // appending to the spool
    double standby = 0;  // starting writes to the standby image (a full window waits)
    double tail = 0;     // after the last frame: last writes drain, spool syncs
  } times;
  // A complete epoch is durable in the spool and not applied yet.
  uint64_t durable_seq = 0;
  int64_t last_point_time_ns = 0;  // of the newest point this Target made
  // Which of its points retention keeps: its source's rules (Hello), else
  // the sink's. Unknown (a spool applied before its source said): none go.
  std::optional<RetentionRules> rules;
  bool recovered = false;     // RecoverSpool ran to its end
  bool sink_fault = false;    // the failure is the sink's (cluster, spool), not the link's
  bool source_fault = false;  // the source abandoned the epoch and said why
  // The standby image's head is known equal to restore point last_seq
  // (this Target took the point's snapshot right after a whole apply and
  // has written nothing since); else PrepareTarget puts it back first.
  bool head_at_point = false;
  // No point yet, and the image holds data it was adopted with
  // (ResyncBaseOf): the first epoch must be compared with it by digests.
  bool resync_base = false;
  // Why the spool refused the epoch: kSpoolDiskFull, kSpoolQuota (else kNone).
  Reason spool_refused = Reason::kNone;
  // The epoch whose records were written to the standby image as they
  // arrived (ReceiveEpoch): ApplyAndCommit then needs no replay of its spool.
  struct Streamed {
    uint64_t seq = 0;
    EpochSummary summary;
    std::unique_ptr<Volume> vol;
    MemoryBudget::Lease memory;          // what apply's window holds
    std::unique_ptr<ApplyStream> apply;  // after vol and memory: destroyed first
  };
  std::unique_ptr<Streamed> streamed;
  // The standby image of the newest commit, kept open for retention
  // (PruneCommitted), which runs after the APPLIED ack: the source's next
  // epoch need not wait for old snapshots to go.
  std::unique_ptr<Volume> committed;
  // The removal of the newest point's spool (its destructor waits for it,
  // as does the next assignment).
  std::future<void> spool_removal;
};

}  // namespace cairn
