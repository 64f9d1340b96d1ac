// SendEpoch: the source's half of an epoch (see epoch.h). Reads of the
// source snapshot complete out of order into one bounded arena; records
// leave in order.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <deque>
#include <memory>
#include <optional>

#include "engine/epoch/block_digests.h"
#include "engine/epoch/epoch.h"
#include "engine/epoch/zeros.h"
#include "proto/cairn.pb.h"

namespace cairn {
namespace {

// Zero detection granularity: runs of zeros at least this aligned and
// long travel as zero records. The grain of digests too.
constexpr uint64_t kZeroGrain = kDigestGrain;

struct AlignedFree {
  void operator()(char* p) const { std::free(p); }
};
using AlignedBuffer = std::unique_ptr<char, AlignedFree>;

AlignedBuffer AllocateAligned(size_t n) {
  void* p = nullptr;
  if (posix_memalign(&p, 4096, n) != 0) return nullptr;
  return AlignedBuffer(static_cast<char*>(p));
}

// Read buffers of one epoch: one arena of `capacity` bytes, carved into
// 4 KiB-aligned pieces in the order records are sent and returned in the
// same order (a ring). Any mix of record sizes fits in the same memory: 8
// reads of 4 MiB, or 512 of 64 KiB.
class FifoArena {
 public:
  Status Init(size_t capacity) {
    capacity_ = RoundUp(capacity);
    mem_ = AllocateAligned(capacity_);
    if (!mem_) {
      return ResourceExhausted(fmt::format("cannot allocate {} bytes of read buffers", capacity_));
    }
    return OkStatus();
  }
  // A piece of `n` bytes after the newest one, or nullptr until older ones
  // are returned. REQUIRES: n <= capacity.
  char* Take(size_t n) {
    n = RoundUp(n);
    assert(n <= capacity_);
    size_t at;
    if (live_.empty()) {
      at = 0;
    } else if (tail_ < head_) {
      // Live pieces run from tail_ to head_: room after head_, else at 0.
      if (capacity_ - head_ >= n) {
        at = head_;
      } else if (tail_ >= n) {
        at = 0;
      } else {
        return nullptr;
      }
    } else {
      // Wrapped: live pieces run from tail_ to the end, then 0 to head_.
      if (tail_ - head_ >= n) {
        at = head_;
      } else {
        return nullptr;
      }
    }
    live_.push_back({at, n});
    head_ = at + n;
    tail_ = live_.front().at;
    return mem_.get() + at;
  }
  // Returns the oldest piece.
  void GiveBackOldest() {
    assert(!live_.empty());
    live_.pop_front();
    if (live_.empty()) {
      head_ = tail_ = 0;
    } else {
      tail_ = live_.front().at;
    }
  }

 private:
  static size_t RoundUp(size_t n) { return (n + 4095) / 4096 * 4096; }
  struct Piece {
    size_t at;
    size_t n;
  };
  size_t capacity_ = 0;
  AlignedBuffer mem_;
  std::deque<Piece> live_;
  size_t head_ = 0;  // end of the newest piece
  size_t tail_ = 0;  // start of the oldest piece
};

// Reads of the source snapshot in flight at once, at most (whatever their
// size: the arena bounds the bytes).
constexpr uint64_t kMaxReadsInFlight = 64;

// Sends the records of one epoch in order while reads complete out of
// order: a FIFO of records whose data reads may still be in flight.
class RecordPipeline {
 public:
  RecordPipeline(const EpochPlan& plan, const SendOptions& opt, FrameWriter& out)
      : plan_(plan), opt_(opt), out_(out), hasher_(plan.id.seq, plan.id.image_size) {
    summary_.id = plan.id;
    summary_.prev_chain = plan.prev_chain;
    if (opt.base) {
      base_.emplace(*opt.base, plan.id.image_size);
      // Reads of whole grains, so that each grain is in one buffer.
      read_unit_ = std::max<uint64_t>(kDigestGrain, opt.block_size / kDigestGrain * kDigestGrain);
    }
  }

  // The source's memory: `window` blocks of `block_size` (two reads, at
  // least, when reads are of whole grains).
  Status Init() {
    return arena_.Init(std::max(uint64_t{opt_.window} * opt_.block_size, 2 * read_unit_));
  }

  const SendTimes& times() const { return times_; }

  // The I/O is owned here and declared after the arena, so it is destroyed
  // first: its destructor waits for reads still using arena buffers.
  void set_io(std::unique_ptr<AsyncIo> io) { io_ = std::move(io); }

  Status AddExtent(const Extent& e) {
    if (e.kind == RecordKind::kZero) {
      queue_.push_back({e.offset, e.length, RecordKind::kZero, nullptr, true});
      return Emit();
    }
    uint64_t off = e.offset;
    const uint64_t end = e.offset + e.length;
    while (off < end) {
      // Cut blocks at multiples of block_size so they line up with objects.
      const uint64_t boundary = (off / read_unit_ + 1) * read_unit_;
      const uint64_t len = std::min(end, boundary) - off;
      char* buf = nullptr;
      while (reads_ >= kMaxReadsInFlight || (buf = arena_.Take(len)) == nullptr) {
        RETURN_IF_ERROR(WaitOne());
      }
      queue_.push_back({off, len, RecordKind::kData, buf, false});
      const uint64_t tag = first_tag_ + queue_.size() - 1;
      ++reads_;
      RETURN_IF_ERROR(io_->StartRead(tag, off, std::span<char>(buf, len)));
      off += len;
      RETURN_IF_ERROR(Emit());
    }
    return OkStatus();
  }

  // Waits for every read; their records are sent.
  Status WaitReads() {
    while (io_->InFlight() > 0) RETURN_IF_ERROR(WaitOne());
    return Emit();
  }

  // REQUIRES: WaitReads() returned OK.
  StatusOr<EpochSummary> Finish() {
    assert(io_->InFlight() == 0 && queue_.empty());
    summary_.epoch_digest = hasher_.Finish();
    summary_.chain = NextChain(plan_.prev_chain, summary_.epoch_digest, plan_.id.seq);
    pb::EpochEnd end;
    end.set_seq(plan_.id.seq);
    end.set_records(summary_.records);
    end.set_data_bytes(summary_.data_bytes);
    end.set_zero_bytes(summary_.zero_bytes);
    end.set_epoch_digest(summary_.epoch_digest.AsBytes());
    end.set_prev_chain(plan_.prev_chain.AsBytes());
    end.set_chain_digest(summary_.chain.AsBytes());
    RETURN_IF_ERROR(out_.Write(FrameType::kEpochEnd, end.SerializeAsString(), {}));
    return summary_;
  }

 private:
  // A record to send; records leave in order, so the queue's front is the
  // oldest piece of the arena. A read's tag is its position in the queue
  // counted from the first record of the epoch.
  struct Pending {
    uint64_t offset;
    uint64_t length;
    RecordKind kind;
    char* buf;  // data records: the arena piece the read fills
    bool done;  // no read in flight
  };

  Status WaitOne() {
    const auto t0 = opt_.clock->Now();
    AsyncIo::Completion c = io_->WaitOne();
    times_.reads += opt_.clock->SecondsSince(t0);
    --reads_;
    if (!c.status.ok()) return c.status.Annotate("reading the source snapshot");
    assert(c.tag >= first_tag_ && c.tag - first_tag_ < queue_.size());
    queue_[c.tag - first_tag_].done = true;
    return Emit();
  }

  // Sends every record at the head of the queue whose data is in.
  Status Emit() {
    while (!queue_.empty() && queue_.front().done) {
      const Pending& p = queue_.front();
      if (base_) {
        RETURN_IF_ERROR(SendAgainstBase(p));
        if (p.buf != nullptr) arena_.GiveBackOldest();
      } else if (p.buf == nullptr) {
        RETURN_IF_ERROR(SendRecord(p.offset, p.length, RecordKind::kZero, {}));
      } else {
        RETURN_IF_ERROR(SendData(p.offset, std::span<const char>(p.buf, p.length)));
        arena_.GiveBackOldest();
      }
      queue_.pop_front();
      ++first_tag_;
    }
    return OkStatus();
  }

  // Splits a block that was read into runs of data and of zeros, at
  // kZeroGrain boundaries: zeros travel as zero records (no bytes) and the
  // standby image stays as sparse as the source.
  Status SendData(uint64_t offset, std::span<const char> bytes) {
    size_t run_start = 0;
    bool run_zero = false;
    size_t pos = 0;
    while (pos < bytes.size()) {
      const uint64_t abs = offset + pos;
      const size_t grain = std::min<uint64_t>(kZeroGrain - abs % kZeroGrain, bytes.size() - pos);
      const bool zero = IsAllZero(bytes.subspan(pos, grain));
      if (pos > 0 && zero != run_zero) {
        RETURN_IF_ERROR(SendRun(offset, bytes, run_start, pos, run_zero));
        run_start = pos;
      }
      run_zero = zero;
      pos += grain;
    }
    return SendRun(offset, bytes, run_start, pos, run_zero);
  }

  // Resync by digests: each grain of `p` (whole grains, or the image's
  // last) is compared with the base's, and only those that differ are
  // sent, as zeros or as data; runs of them are merged.
  Status SendAgainstBase(const Pending& p) {
    assert(p.offset % kDigestGrain == 0);
    uint64_t run_from = p.offset;
    uint64_t run_to = p.offset;
    bool run_zero = false;
    for (uint64_t at = p.offset; at < p.offset + p.length; at += kDigestGrain) {
      const uint64_t len = std::min<uint64_t>(kDigestGrain, p.offset + p.length - at);
      const std::span<const char> bytes =
          p.buf ? std::span<const char>(p.buf + (at - p.offset), len) : std::span<const char>();
      const GrainDigest mine = p.buf ? DigestOfGrain(bytes) : GrainDigest();
      ASSIGN_OR_RETURN(const GrainDigest theirs, base_->At(at));
      if (mine == theirs) continue;
      const bool zero = mine.IsZero();
      if (run_to != at || zero != run_zero) {
        RETURN_IF_ERROR(SendBaseRun(p, run_from, run_to, run_zero));
        run_from = at;
        run_zero = zero;
      }
      run_to = at + len;
    }
    return SendBaseRun(p, run_from, run_to, run_zero);
  }

  // Data runs leave in records of block_size at most.
  Status SendBaseRun(const Pending& p, uint64_t from, uint64_t to, bool zero) {
    if (zero) return from == to ? OkStatus() : SendRecord(from, to - from, RecordKind::kZero, {});
    for (uint64_t at = from; at < to;) {
      const uint64_t len = std::min<uint64_t>(opt_.block_size, to - at);
      RETURN_IF_ERROR(SendRecord(at, len, RecordKind::kData,
                                 std::span<const char>(p.buf + (at - p.offset), len)));
      at += len;
    }
    return OkStatus();
  }

  Status SendRun(uint64_t offset, std::span<const char> bytes, size_t from, size_t to, bool zero) {
    if (to == from) return OkStatus();
    return zero ? SendRecord(offset + from, to - from, RecordKind::kZero, {})
                : SendRecord(offset + from, to - from, RecordKind::kData,
                             bytes.subspan(from, to - from));
  }

  Status SendRecord(uint64_t offset, uint64_t length, RecordKind kind,
                    std::span<const char> payload) {
    const BlockHash h = kind == RecordKind::kData ? BlockHash::Of(payload) : BlockHash();
    record_.Clear();
    record_.set_index(summary_.records);
    record_.set_offset(offset);
    record_.set_length(length);
    record_.set_kind(kind == RecordKind::kData ? pb::DATA : pb::ZERO);
    record_.set_xxh3(h.value());
    record_.set_seq(plan_.id.seq);
    record_.SerializeToString(&body_);
    if (summary_.records >= plan_.skip_records) {
      const auto t0 = opt_.clock->Now();
      Status st = out_.Write(FrameType::kRecord, body_, payload);
      times_.link += opt_.clock->SecondsSince(t0);
      RETURN_IF_ERROR(st);
    }
    hasher_.Add(offset, length, kind, h);
    ++summary_.records;
    (kind == RecordKind::kData ? summary_.data_bytes : summary_.zero_bytes) += length;
    return OkStatus();
  }

  const EpochPlan& plan_;
  const SendOptions& opt_;
  FrameWriter& out_;
  SendTimes times_;
  EpochHasher hasher_;
  EpochSummary summary_;
  FifoArena arena_;
  std::deque<Pending> queue_;
  uint64_t first_tag_ = 0;  // tag of queue_.front()
  uint64_t reads_ = 0;      // in flight
  pb::Record record_;
  std::string body_;
  // Resync by digests: the base's, and reads of whole grains.
  std::optional<DigestCursor> base_;
  uint64_t read_unit_ = opt_.block_size;
  std::unique_ptr<AsyncIo> io_;
};

// Resync by digests: the allocated extents of `snap`, grown to whole
// grains (what they add reads as zeros) and merged, as data; the gaps
// between them as zeros. `covered`: where the last one ends.
Status AddGrainAligned(Volume& vol, const std::string& snap, uint64_t size, RecordPipeline& pipe,
                       uint64_t* covered) {
  std::optional<Extent> data;  // not added yet: the next may join it
  uint64_t listed = 0;         // where the last extent listed ends
  RETURN_IF_ERROR(vol.DiffExtents("", snap, [&](const Extent& e) -> Status {
    if (e.offset < listed) return Internal("DiffExtents listed extents out of order");
    listed = e.offset + e.length;
    const uint64_t from = e.offset / kDigestGrain * kDigestGrain;
    const uint64_t to =
        std::min(size, (e.offset + e.length + kDigestGrain - 1) / kDigestGrain * kDigestGrain);
    if (data && from <= *covered) {
      data->length = std::max(*covered, to) - data->offset;
    } else {
      if (data) RETURN_IF_ERROR(pipe.AddExtent(*data));
      if (from > *covered) {
        RETURN_IF_ERROR(pipe.AddExtent({*covered, from - *covered, RecordKind::kZero}));
      }
      data = Extent{from, to - from, RecordKind::kData};
    }
    *covered = data->offset + data->length;
    return OkStatus();
  }));
  return data ? pipe.AddExtent(*data) : OkStatus();
}

}  // namespace

StatusOr<EpochSummary> SendEpoch(Volume& vol, const EpochPlan& plan, const SendOptions& options,
                                 FrameWriter& out, SendTimes* times) {
  assert(options.block_size > 0 && options.block_size <= kMaxPayload);
  assert(options.window > 0);
  pb::EpochBegin begin;
  begin.set_volume(plan.id.volume);
  begin.set_seq(plan.id.seq);
  begin.set_base_seq(plan.id.base_seq);
  begin.set_image_size(plan.id.image_size);
  begin.set_snap_time_ns(plan.id.snap_time_ns);
  begin.set_max_block(options.block_size);
  begin.set_source_site(plan.id.source_site);
  begin.set_resume_from(plan.skip_records);
  begin.set_group(plan.id.group);
  begin.set_group_members(plan.id.group_members);

  if (plan.to_snap_id == 0 || (!plan.from_snap.empty() && plan.from_snap_id == 0)) {
    return InvalidArgument(
        fmt::format("epoch {} of {}: the plan lacks a snapshot's id", plan.id.seq, plan.id.volume));
  }
  WatchedWriter writer(out);
  RecordPipeline pipe(plan, options, writer);
  RETURN_IF_ERROR(pipe.Init());
  const auto t0 = options.clock->Now();
  Status streamed = [&]() -> Status {
    ASSIGN_OR_RETURN(auto io, vol.OpenIo(plan.to_snap));
    pipe.set_io(std::move(io));
    RETURN_IF_ERROR(writer.Write(FrameType::kEpochBegin, begin.SerializeAsString(), {}));
    if (!plan.resync) {
      RETURN_IF_ERROR(vol.DiffExtents(plan.from_snap, plan.to_snap,
                                      [&](const Extent& e) { return pipe.AddExtent(e); }));
      return pipe.WaitReads();
    }
    // Resync: the gaps between allocated extents travel as zero records.
    const uint64_t size = plan.id.image_size;
    uint64_t covered = 0;
    if (!options.base) {
      RETURN_IF_ERROR(vol.DiffExtents("", plan.to_snap, [&](const Extent& e) -> Status {
        if (e.offset < covered) return Internal("DiffExtents listed extents out of order");
        if (e.offset > covered) {
          RETURN_IF_ERROR(pipe.AddExtent({covered, e.offset - covered, RecordKind::kZero}));
        }
        covered = e.offset + e.length;
        return pipe.AddExtent(e);
      }));
    } else {
      RETURN_IF_ERROR(AddGrainAligned(vol, plan.to_snap, size, pipe, &covered));
    }
    if (covered < size)
      RETURN_IF_ERROR(pipe.AddExtent({covered, size - covered, RecordKind::kZero}));
    return pipe.WaitReads();
  }();
  if (writer.failed()) return streamed;
  // A snapshot removed (or an image removed, renamed or replaced) while it
  // was read may have read as zeros: then no EpochEnd, so never a point. A
  // failed read or listing is checked too: a vanished snapshot is its
  // likely cause, and the one worth reporting.
  Status gone = vol.ConfirmSnap(plan.to_snap, plan.to_snap_id);
  if (gone.ok() && !plan.from_snap.empty())
    gone = vol.ConfirmSnap(plan.from_snap, plan.from_snap_id);
  if (gone.code() == Code::kNotFound || (streamed.ok() && !gone.ok())) {
    return gone.Annotate(fmt::format("epoch {} of {} is discarded", plan.id.seq, plan.id.volume));
  }
  RETURN_IF_ERROR(streamed);
  auto sum = pipe.Finish();
  if (times) {
    *times = pipe.times();
    times->total = options.clock->SecondsSince(t0);
  }
  return sum;
}

}  // namespace cairn
