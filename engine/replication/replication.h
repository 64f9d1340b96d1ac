// Shared vocabulary of the source and sink roles.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/base/checksum.h"
#include "engine/volume/volume.h"

namespace cairn {

// Version of the link protocol (Hello/HelloReply/EpochAck and the journal
// frames). A peer speaking another version is refused with a clear error.
inline constexpr uint32_t kProtocolVersion = 1;

// How long each side waits for the other. Production values are generous
// (applying a large epoch takes as long as writing it); the simulator sets
// them short so that a lost frame costs milliseconds, not minutes.
struct LinkTimeouts {
  std::chrono::milliseconds hello{30'000};    // Hello -> HelloReply
  std::chrono::milliseconds stall{120'000};   // between frames of one epoch
  std::chrono::milliseconds ack{1'800'000};   // EpochEnd -> EpochAck APPLIED
  std::chrono::milliseconds idle{3'600'000};  // sink: between epochs
};

// What a sink that took a volume's image back as the primary answered a
// hand-back (Hello.hand_back_seq): its site, the point's chain digest, and
// when its own snapshot of the point was taken.
struct HandedBack {
  std::string site;
  ChainDigest chain;
  int64_t snap_time_ns = 0;
};

// Where one volume is, on one node. `cairn status` shows StateName().
enum class VolumeState {
  kIdle,          // between epochs (the newest point is last_seq)
  kSyncing,       // source: an epoch is being sent
  kReceiving,     // sink: an epoch is being received
  kApplying,      // the epoch is durable at the sink, its point being made
  kDisconnected,  // the peer cannot be reached: retried with backoff
  kError,         // the last attempt failed on this side (see error)
  kStandby,       // source: the other site is the primary and replicates
                  // into this image (failed over); nothing is sent or
                  // snapshotted until it hands the image back (failback)
};

// "idle", "syncing", "receiving", "applying", "disconnected", "error",
// "standby".
std::string_view StateName(VolumeState state);

// A source's verify of one restore point (cairn verify): in progress, or
// the last one.
struct VerifyStatusInfo {
  uint64_t id = 0;  // 0: none since cairnd started
  uint64_t seq = 0;
  bool running = false;
  uint64_t done_bytes = 0;
  uint64_t total_bytes = 0;
  uint64_t mismatched_grains = 0;
  uint32_t grain = 0;
  std::vector<Extent> mismatches;  // the first kListed merged ranges
  static constexpr size_t kListed = 16;
  std::string error;  // it could not finish
  double seconds = 0;
  bool repair = false;        // a repair epoch was asked for the mismatch
  uint64_t repaired_seq = 0;  // the point that holds the repair (0: none yet)
};

// What `cairn status` shows for one volume on one node.
struct VolumeStatusInfo {
  std::string volume;
  std::string role;  // "source" | "sink"
  VolumeState state = VolumeState::kIdle;
  std::string pool;
  std::string image;
  std::string peer;
  uint64_t last_seq = 0;           // newest restore point
  int64_t last_point_time_ns = 0;  // source time of that point
  // now - when the newest point last held the image: its snapshot's time,
  // or a later check that found nothing changed (0 if no point)
  double lag_seconds = 0;
  double throughput_bps = 0;  // of the last epoch
  uint64_t bytes_total = 0;
  uint64_t epochs_total = 0;
  uint64_t errors_total = 0;          // failed attempts (connect, epoch, apply)
  uint64_t corrupt_frames_total = 0;  // sink: frames refused by verification
  uint64_t resumed_epochs_total = 0;  // epochs finished from a durable prefix
  uint64_t pending_snapshots = 0;     // source: snapshots not yet restore points
  // source: due epochs skipped, nothing changed; sink: the source's word
  // of each (Unchanged frames)
  uint64_t unchanged_checks_total = 0;
  // sink: when the source last found the image unchanged since last_seq
  // (source time; 0: never since that point)
  int64_t unchanged_as_of_ns = 0;
  // source, while syncing: data bytes of the epoch in progress sent so far
  uint64_t epoch_sent_bytes = 0;
  // source: payload bytes of the data records put on the link since cairnd
  // started, compressed ones as compressed (against bytes_total: what
  // `compression` saves; resent epochs count again)
  uint64_t wire_bytes_total = 0;
  // How long the epochs took (source: send began to APPLIED; sink:
  // EpochBegin to the point made), counted in buckets of at most
  // kEpochSecondsBuckets[i] seconds (the last: any), and their sum.
  static constexpr std::array<double, 12> kEpochSecondsBuckets = {0.1, 0.25, 0.5, 1,   2.5, 5,
                                                                  10,  30,   60,  120, 300, 600};
  std::array<uint64_t, kEpochSecondsBuckets.size() + 1> epoch_seconds_count{};
  double epoch_seconds_sum = 0;
  void CountEpochSeconds(double secs) {
    size_t i = 0;
    while (i < kEpochSecondsBuckets.size() && secs > kEpochSecondsBuckets[i]) ++i;
    epoch_seconds_count[i] += 1;
    epoch_seconds_sum += secs;
  }
  std::string error;        // the last error, empty if the last step succeeded
  VerifyStatusInfo verify;  // source
};

// A consistency group's source side (GroupSource::Report).
struct GroupStatusInfo {
  std::string group;
  std::string pool;
  std::vector<std::string> volumes;  // the members, by volume id
  uint64_t instant_seq = 0;          // the newest instant taken (0: none yet)
  int64_t instant_time_ns = 0;       // when it was taken
  // The newest instant every member has made a point of: the group's
  // newest point (0: none yet, or not since this process started).
  uint64_t last_seq = 0;
  int64_t last_time_ns = 0;  // when that instant was taken (0: not known here)
  // When a check last found no member changed since instant last_seq
  // (the group held that point as of then).
  int64_t unchanged_at_ns = 0;
  uint64_t instants_total = 0;
  // The members that have not made their point of the newest instant yet
  // (the next instant waits for them).
  std::vector<std::string> waiting_for;
  std::string error;  // why the last instant could not be taken
};

}  // namespace cairn
