// Epochs: the changed-block journal of one step of replication.
//
// An epoch N of a volume is the set of blocks that differ between the
// source snapshots cairn.<base> and cairn.<N> (or, for the first epoch,
// the allocated extents of cairn.<N>). On the wire and in the spool it is
// a sequence of frames:
//
//   EpochBegin  Record(index 0) ... Record(index k-1)  EpochEnd
//
// SendEpoch (source) lists the changed extents, reads data extents with a
// bounded window of concurrent aio reads, hashes each block with XXH3-64,
// sends runs that read as zeros (64 KiB-aligned) as zero records, and ends with the
// epoch's XXH3-128 digest and its chain digest.
//
// EpochVerifier (sink) checks every frame of an epoch in order: sequence,
// bounds, payload hash, record order, digest and chain. It is used twice:
// when frames arrive (before they reach the spool) and when the spool is
// replayed onto the standby image (ApplyEpoch), so nothing is ever applied
// that was not verified from the bytes being applied.
//
// Memory: SendEpoch holds `window` buffers of `block_size` bytes; ApplyEpoch
// holds `window` frames. Neither grows with the image.
//
// Thread-safety: none; one epoch is handled by one thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "engine/base/checksum.h"
#include "engine/base/clock.h"
#include "engine/base/status.h"
#include "engine/epoch/epoch_id.h"
#include "engine/format/frame.h"
#include "engine/spool/spool.h"
#include "engine/volume/volume.h"

namespace cairn {

class BaseDigests;

// Where SendEpoch writes its frames: a Link, a spool, a test buffer.
class FrameWriter {
 public:
  virtual ~FrameWriter() = default;
  virtual Status Write(FrameType type, std::string_view body, std::span<const char> payload) = 0;
};

// Passes frames on to `out` and remembers whether a write failed: tells a
// failure of the writer (the link) from one of the epoch itself. Adds the
// payload bytes written to `sent`, if given (progress, read by others).
class WatchedWriter final : public FrameWriter {
 public:
  explicit WatchedWriter(FrameWriter& out, std::atomic<uint64_t>* sent = nullptr)
      : out_(out), sent_(sent) {}
  Status Write(FrameType type, std::string_view body, std::span<const char> payload) override {
    Status st = out_.Write(type, body, payload);
    failed_ = failed_ || !st.ok();
    if (st.ok() && sent_) sent_->fetch_add(payload.size(), std::memory_order_relaxed);
    return st;
  }
  bool failed() const { return failed_; }

 private:
  FrameWriter& out_;
  std::atomic<uint64_t>* sent_;
  bool failed_ = false;
};

// The LinkError frame: how either end tells the other why it stops (the
// sink refusing an epoch; the source abandoning one mid-stream).
Status WriteLinkError(FrameWriter& out, const Status& st);
// The error a LinkError frame carries, prefixed with `who`. Never OK: one
// that does not parse or carries code 0 is itself an error of the peer.
Status StatusFromLinkError(const Frame& f, std::string_view who);

struct EpochPlan {
  EpochId id;
  std::string from_snap;  // empty for a full epoch
  std::string to_snap;
  // The snapshots' ids as listed when the epoch was planned: after its
  // reads, the epoch ends only if both still exist with these ids
  // (Volume::ConfirmSnap). Required for every snapshot named.
  uint64_t from_snap_id = 0;
  uint64_t to_snap_id = 0;
  ChainDigest prev_chain;  // chain digest of base_seq (zero if none)
  // Records before this index are built and hashed but not written: the
  // receiver already holds them (resume after a cut).
  uint64_t skip_records = 0;
  // Resync over a base that was lost at the source: every byte of to_snap
  // is sent (from_snap empty), unallocated ranges as zero records, so the
  // receiver's image ends equal whatever it held before.
  bool resync = false;
};

// The largest data record by default: an RBD object (4 MiB), so a full sync
// writes each object of the standby image in one operation. The one default
// of [volume] block_size.
inline constexpr uint32_t kDefaultBlockSize = 4u << 20;

// The source's read memory for an epoch by default, in blocks ([volume]
// window): 16 MiB of 4 MiB blocks. As many reads of the snapshot as fit in
// it are in flight, up to 64: 4 whole objects, or 64 small changed
// extents. (8 synced no faster and took the source's peak RSS to 132 MiB:
// librados holds each read's reply too.)
inline constexpr uint32_t kDefaultReadWindow = 4;
// The sink's writes in flight by default ([sink] window and window_bytes):
// each holds one received record; together at most 32 MiB, which is 8
// writes of 4 MiB records or 32 of 1 MiB.
inline constexpr uint32_t kDefaultApplyWindow = 32;
inline constexpr uint64_t kDefaultApplyWindowBytes = 32u << 20;

struct SendOptions {
  // Largest data record payload ([volume] block_size).
  uint32_t block_size = kDefaultBlockSize;
  // The read memory is window x block_size (reads in flight: as many as
  // fit, at most 64).
  uint32_t window = kDefaultReadWindow;
  // What SendTimes are measured on.
  Clock* clock = &RealClock();
  // A resync (plan.resync) by digests: each grain is compared with the
  // receiver's base (block_digests.h) and sent only if it differs. None:
  // every byte is sent.
  BaseDigests* base = nullptr;
};

struct ApplyOptions {
  // Writes in flight, at most.
  uint32_t window = kDefaultApplyWindow;
  // Bytes of writes in flight, at most (a record larger than this is
  // written alone). 0: `window` writes, whatever their size.
  uint64_t window_bytes = kDefaultApplyWindowBytes;
};

struct EpochSummary {
  EpochId id;
  uint64_t records = 0;
  uint64_t data_bytes = 0;
  uint64_t zero_bytes = 0;
  EpochDigest epoch_digest;
  ChainDigest prev_chain;
  ChainDigest chain;
  uint32_t max_block = 0;
  uint64_t resume_from = 0;  // as announced by EpochBegin
};

// Where SendEpoch's time went, in seconds: which end of the pipeline it
// waited on.
// The rest of `total` is work: listing extents, hashing, building frames.
struct SendTimes {
  double total = 0;
  double reads = 0;  // waiting for reads of the snapshot
  double link = 0;   // writing frames (a slow receiver fills the socket)
};

// Streams epoch `plan` of `vol` to `out`. On success returns what was sent.
// Fails with the volume's or the writer's error; the frames already
// written then form an incomplete epoch that the receiver must discard.
// The EpochEnd frame is written only after every read completed and the
// snapshots were confirmed still there (kNotFound if one is gone: what
// was read of it may be zeros).
// `times`, if given, receives where the time went.
StatusOr<EpochSummary> SendEpoch(Volume& vol, const EpochPlan& plan, const SendOptions& options,
                                 FrameWriter& out, SendTimes* times = nullptr);

// One verified item of an epoch, as handed back by EpochVerifier.
struct VerifiedRecord {
  uint64_t index = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  RecordKind kind = RecordKind::kData;
};

class EpochVerifier {
 public:
  // `volume`: the volume this epoch must be for. `base_seq`/`prev_chain`:
  // the newest restore point the receiver holds (0/zero if none); the epoch
  // must build on exactly that.
  EpochVerifier(std::string volume, uint64_t base_seq, ChainDigest prev_chain);

  enum class Step { kBegin, kRecord, kEnd };
  // Checks the next frame of the epoch. kDataLoss (exact messages, see
  // epoch_verify.cc) for anything that does not verify: the frame must not be
  // kept. kFailedPrecondition when the epoch does not build on the
  // receiver's newest point (the source must re-plan).
  StatusOr<Step> Check(const Frame& frame);

  // Valid after the kBegin step.
  const EpochSummary& begin() const { return summary_; }
  // Valid after a kRecord step: the record just checked.
  const VerifiedRecord& record() const { return record_; }
  // Valid after the kEnd step: the whole verified epoch.
  const EpochSummary& summary() const { return summary_; }
  bool done() const { return done_; }

 private:
  // One per frame type; each checks a frame of its type and records it.
  StatusOr<Step> CheckBegin(const Frame& f);
  StatusOr<Step> CheckRecord(const Frame& f);
  StatusOr<Step> CheckEnd(const Frame& f);

  std::string volume_;
  uint64_t base_seq_;
  ChainDigest prev_chain_;
  bool begun_ = false;
  bool done_ = false;
  uint64_t next_index_ = 0;
  uint64_t next_offset_ = 0;
  EpochSummary summary_;
  VerifiedRecord record_;
  std::unique_ptr<EpochHasher> hasher_;
};

// Replays a whole epoch from `spool` onto `target` (its head), verifying
// every frame again with `verifier`, resizing the image to the epoch's size
// first, and flushing at the end. Returns the verified summary. Writes are
// idempotent: replaying an epoch again after a crash gives the same image.
// kFreshImage: `target` was just created (reads as zeros), so zero records
// need no I/O.
enum class TargetState { kHasData, kFreshImage };

// Writes the verified records of one epoch to `target` (its head) with a
// bounded window of concurrent writes, in the order they are given. The
// sink uses it twice: while frames arrive (the apply overlaps the receive,
// so a sync runs at the pace of the slower of the two instead of their
// sum), and to replay a spool (ApplyEpoch). Either way the restore point is
// made only after the whole epoch verified and is durable: until then the
// head is the sink's staging area between two points, and any later epoch
// from the same base rewrites every block a cut one wrote.
//
// Memory: holds at most `window` frames. Thread-safety: none.
class ApplyStream {
 public:
  // REQUIRES: `target` outlives this object.
  ApplyStream(Volume& target, const ApplyOptions& options, TargetState state);
  // Waits for the writes in flight (none may outlive its frame).
  ~ApplyStream();
  ApplyStream(const ApplyStream&) = delete;
  ApplyStream& operator=(const ApplyStream&) = delete;

  // Resizes the target to the epoch's size and opens it for I/O.
  Status Begin(uint64_t image_size);
  // Starts the write of record `r`, whose verified frame is `frame` (kept
  // until the write completes). Blocks while the window is full. Fails with
  // the error of a write that completed with one.
  Status Add(const VerifiedRecord& r, Frame frame);
  // Waits for every write and flushes them. OK: the records given are on
  // the target.
  Status Finish();
  // What is in flight now: at most options.window writes and, unless one
  // record is larger, options.window_bytes bytes of payload.
  size_t writes_in_flight() const { return frames_.size() - free_.size(); }
  uint64_t bytes_in_flight() const { return bytes_in_flight_; }

 private:
  Status WaitOne();

  Volume& target_;
  ApplyOptions options_;
  TargetState state_;
  std::unique_ptr<AsyncIo> io_;
  std::vector<Frame> frames_;  // one slot per write that may be in flight
  std::vector<uint32_t> free_;
  uint64_t bytes_in_flight_ = 0;
};

StatusOr<EpochSummary> ApplyEpoch(SpoolReader& spool, EpochVerifier& verifier, Volume& target,
                                  const ApplyOptions& options, TargetState state);

// Puts the head of `target` back as it is at `point` (its size, and every
// extent the head changed since) and returns the bytes put back. An epoch
// applies the changes from its base onto the head; writes left there by an
// epoch that never completed (abandoned by its source, or cut and not
// resumed) lie outside those changes and would stay in the next point.
// Cost: listing the head's changes since `point` (cheap with fast-diff),
// plus one read and one write of each changed byte; 0 when none changed.
StatusOr<uint64_t> RevertToPoint(Volume& target, const SnapInfo& point);
// Bytes of `vol`'s head that differ from its snapshot `snap`, as
// RevertToPoint would count them (a resize counts the bytes gained or
// lost), without reading any; 0 if ChangedSince says nothing changed.
StatusOr<uint64_t> BytesSince(Volume& vol, const SnapInfo& snap);
// Writes onto the head of `dst` what `src` changed from its snapshot `from`
// to its snapshot `to` (sized as `to`), and returns the data bytes written
// (64 KiB pieces that read as zeros are not counted; zero ranges are made
// thin).
// Every piece is read back from `dst` and compared with what was read by
// XXH3 (kDataLoss naming the offset if it differs), and the reads of `to`
// are confirmed (Volume::ConfirmSnap) before it returns: nothing read from
// a snapshot removed meanwhile counts. `dst`'s head must hold what `src`
// held at `from` for the result to equal `to`. One 4 MiB buffer at a time.
StatusOr<uint64_t> CopyChanges(Volume& src, const SnapInfo& from, const SnapInfo& to, Volume& dst);

}  // namespace cairn
